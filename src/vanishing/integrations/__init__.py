"""Trainer integrations: thin callbacks that attach a monitor inside a trainer's loop.

``vanishing.integrations.lightning.VanishingCallback`` (``lightning.Trainer``) and
``vanishing.integrations.transformers.VanishingCallback`` (``transformers.Trainer``); each needs
its extra (``pip install "vanishing[lightning]"`` / ``"vanishing[transformers]"``).
"""
