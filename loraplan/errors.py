"""Errors a user can cause. The CLI prints ``str(error)`` on one line and exits 2.

Every message names the bad value and says how to fix it.
"""


class LoraplanError(Exception):
    """Base class: a problem with the user's input or environment (not a bug)."""

    exit_code = 2


class UnknownNameError(LoraplanError):
    """A catalog name (model, GPU, optimizer, ...) that does not exist."""


class ConfigError(LoraplanError):
    """A config.json (or grid file) that cannot be read or understood."""


class InputError(LoraplanError):
    """A numeric or option value out of range, or a contradictory combination."""


class TargetError(LoraplanError):
    """LoRA target modules that match nothing in the model."""


class MissingExtraError(LoraplanError):
    """An optional dependency group (``[profile]``, ``[report]``) is not installed."""


class DeviceError(LoraplanError):
    """The device asked for is not there (e.g. --device cuda on a machine without CUDA)."""


class TraceError(LoraplanError):
    """The meta-device trace could not run this setup."""


class TraceDataDependentError(TraceError):
    """An op needs tensor values (``.item()``, data-dependent shapes) on meta."""


class TraceTimeoutError(TraceError):
    """The trace worker ran past its time limit."""



class RecordsError(LoraplanError):
    """A records file that cannot be written (read-only folder, full disk); a measurement made
    before the failure is kept in a recovery file that the message names."""


class ProfileBusyError(LoraplanError):
    """Another ``loraplan profile`` run holds the records file (or the GPU) this run needs."""


class HostMemoryError(DeviceError):
    """The model's weights would not fit in the host RAM that is available."""

def suggest(name: str, choices, n: int = 3) -> str:
    """', did you mean a, b?' for the closest names, or '' when none is close."""
    import difflib

    close = difflib.get_close_matches(name.lower(), list(choices), n=n, cutoff=0.5)
    if not close:
        # substring matches help for e.g. "llama-7b" -> "llama-2-7b"
        close = [c for c in choices if name.lower() in c][:n]
    return f"; did you mean {', '.join(close)}?" if close else ""


def require_extra(module: str, extra: str = "profile") -> None:
    """Raise MissingExtraError with the pip command when ``module`` cannot be imported."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise MissingExtraError(
            f"this needs the optional package '{module}', which is not installed; "
            f"install it with: pip install 'loraplan[{extra}]'"
        )
