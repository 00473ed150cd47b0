"""SDXL specifics: key maps between diffusers and single-file naming, detection, bundled base configs."""

from pathlib import Path

CONFIGS = Path(__file__).parent / "configs"
SDXL_BASE_CONFIGS = CONFIGS / "sdxl-base"
# The hub repo those configs come from, and where tokenizers are found when no local folder has them.
SDXL_BASE_REPO = "stabilityai/stable-diffusion-xl-base-1.0"
