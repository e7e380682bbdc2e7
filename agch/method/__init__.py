"""AGCH itself: its networks (model), the joint similarity S (similarity), the losses, the code
diagnostics, the one training loop (train), the device and precision a run uses (device), and the
reference methods scored the same way (baselines: CCA+ITQ and the plain-S trainer's settings)."""
