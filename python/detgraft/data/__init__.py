"""Layer 1, data: a ``Dataset`` (COCO json + images) read from COCO, VOC or YOLO, checked, written,
and turned into training batches. Imports nothing of detgraft above ``progress`` / ``extras``."""

from .check import DataError, check_dataset
from .dataset import Dataset, load_dataset
from .readers import read_checked, read_dataset

__all__ = ["DataError", "Dataset", "check_dataset", "load_dataset", "read_checked", "read_dataset"]
