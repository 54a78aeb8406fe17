"""medssl shards: NIfTI/DICOM datasets → verified webdataset shards → 3D crops for every rank.

Command line: ``python -m medssl.shards {synth,build,verify,info} --help``.
In Python: ``shards.stream(dirs, StreamConfig(...))`` returns a loader of crop batches.
The stream pulls in torch, so it is imported lazily: building shards needs only numpy and nibabel.
"""

from .errors import InputError

__all__ = ["InputError", "stream", "StreamConfig", "Window", "ShardLoader"]


def __getattr__(name):
    if name in ("stream", "StreamConfig", "ShardLoader"):
        import importlib

        return getattr(importlib.import_module(".loader", __name__), name)
    if name == "Window":
        from .crops import Window

        return Window
    raise AttributeError(f"module 'shards' has no attribute {name!r}")
