"""nnU-Net trainer classes shipped with the nnunet plugin, named in ``params.trainer`` like nnU-Net's own.

Every class defined in a module of this folder is found by name (``trainers.py`` reads the sources,
nothing is imported for ``vlab validate``). The folder can also be given to nnU-Net itself as
``nnUNet_extTrainer``, so that ``nnUNetv2_train``/``nnUNetv2_predict`` find these trainers too.
"""
