"""robustdrop: see, measure and avoid the robustness drop of single-step adversarial training."""

__version__ = "0.1.0"
