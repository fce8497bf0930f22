"""Switch storage formats. ``switch``: the binary task switch (T-Switch) container."""

from mergeflow.codecs.switch import (
    FORMAT_NAME,
    FORMAT_VERSION,
    Switch,
    SwitchStats,
    SwitchTensor,
    load_switch,
    save_switch,
    switch_stats,
)

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "Switch", "SwitchStats", "SwitchTensor", "load_switch", "save_switch", "switch_stats"]
