"""Prompts that condition a (possibly compressed) frozen model: learned soft prompts and text (hard) prompts.

``soft.py`` learns a soft prompt, ``artifact.py`` stores and checks it (and exports a PEFT adapter),
``hard.py`` names text prompts, ``target.py`` loads the model a prompt is trained for and fingerprints it.
"""
