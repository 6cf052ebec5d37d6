"""Modality encoders, each registered in ``allspark.registry.ENCODERS`` under its name.

An encoder is an ``nn.Module`` with ``out_dim`` (its token width ``d``) and ``input_keys`` (the batch
keys it reads); ``forward(batch) -> Tokens(tokens[B, n, d], mask[B, n])``. It validates its input and
raises ``ValueError`` naming the key, the expected and the actual shape. Every module of this package is
imported with it, so adding an encoder is adding a file.
"""
from allspark.plugins import import_submodules

import_submodules(__name__)
