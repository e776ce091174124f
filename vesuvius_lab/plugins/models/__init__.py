"""Built-in model plugins: 2.5D networks from segmentation-models-pytorch and 3D networks from MONAI."""
