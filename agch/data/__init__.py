"""Datasets: the project's HDF5 format (dataset), splits, the synthetic stand-ins (synth), importers of the
field's .mat files, fc7 feature extraction from raw images (extract, backbones) and `agch-data info`'s
summary."""
