"""The offline data bundle: readers, the data-set registry, records, tokenisation, refusal markers, triggers."""
