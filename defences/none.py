"""No defence: the base model as it is (the reference every defence is compared with)."""

from __future__ import annotations

from harness.api import LoadedModel, NoParams, StageContext, defences


@defences.register("none", params=NoParams, description="Identity: leave the model unchanged")
def none(model: LoadedModel, params: NoParams, ctx: StageContext) -> None:
    return None  # None tells the pipeline the weights are unchanged, so nothing is copied
