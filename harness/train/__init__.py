"""Training: the shared loop, supervised fine-tuning settings, the RepNoise and baseline losses."""
