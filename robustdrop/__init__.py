"""robustdrop: see, measure and avoid the robustness drop of single-step adversarial training."""

__version__ = "0.1.0"

__all__ = ["Monitor", "TrackConfig", "load_sweep", "make_config", "resume", "sweep", "track"]


def __getattr__(name: str):
    # Lazy, so `import robustdrop` stays cheap and the plots never pull in the training stack.
    if name in ("track", "resume"):
        from robustdrop import api

        return getattr(api, name)
    if name == "Monitor":  # diagnostics on the user's own training loop
        from robustdrop.monitor import Monitor

        return Monitor
    if name == "sweep":  # the function; the package is robustdrop.sweeps
        from robustdrop.sweeps import sweep

        return sweep
    if name == "load_sweep":
        from robustdrop.plots.sweeps import load_sweep

        return load_sweep
    if name in ("TrackConfig", "make_config"):
        from robustdrop.engine import config

        return getattr(config, name)
    raise AttributeError(name)
