"""The model plugin contract: what a model plugin imports besides the registry.

``backend`` (the protocol of plugins that own their training and prediction, e.g. nnU-Net),
``models`` (the 2.5D wrapper that puts a 2D network into the 3D window contract, parameter
counting) and ``windows`` (pure-Python window arithmetic for plugins' ``check`` hooks). Every
stage that trains, predicts or records a model reads it, so it sits below them all.

May import: the root of core only.
"""
