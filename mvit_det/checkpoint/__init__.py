"""Checkpoint interop: read official, mmpretrain, timm, detectron2 and mvit-det files, convert them to
mvit-det's parameter names, download with a hash-checked cache, and load them with strict checks.
"""
from .formats import FORMATS, CheckpointInfo, convert, describe_state_dict, detect_format
from .io import CheckpointFileError, DownloadError, download, load_file, save_checkpoint
from .loading import LoadReport, load_checkpoint, open_source, read_checkpoint, read_converted

__all__ = [
    "FORMATS",
    "CheckpointFileError",
    "CheckpointInfo",
    "DownloadError",
    "LoadReport",
    "convert",
    "describe_state_dict",
    "detect_format",
    "download",
    "load_checkpoint",
    "load_file",
    "open_source",
    "read_checkpoint",
    "read_converted",
    "save_checkpoint",
]
