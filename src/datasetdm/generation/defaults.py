"""The one set of generation defaults: `generate`, `demo`, `downstream`, the gates and every
README figure use them. 25 DDIM steps and guidance 4 are what the embedded backbone's figures
were measured with."""

GENERATION_STEPS = 25
GUIDANCE_SCALE = 4.0
GENERATION_BATCH = 16
