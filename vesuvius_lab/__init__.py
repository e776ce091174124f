"""vesuvius-lab: declarative experiments for 3D papyrus surface segmentation."""

__version__ = "0.1.0"
