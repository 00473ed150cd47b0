"""SDXL specifics: key maps between diffusers and single-file naming, detection, bundled base configs."""

from pathlib import Path

CONFIGS = Path(__file__).parent / "configs"
SDXL_BASE_CONFIGS = CONFIGS / "sdxl-base"
