"""The names `agch-data extract` offers, kept free of torch so that building the CLI's parser stays fast."""

WEIGHT_FILES = {"alexnet": "alexnet-owt-7be5be79.pth", "vgg16": "vgg16-397923af.pth", "vgg19": "vgg19-dcbb9e9d.pth"}
"""torchvision's file names for the ImageNet weights, as they lie in its cache (torch.hub's checkpoints folder)."""
BACKBONES = tuple(WEIGHT_FILES)
RAW_KEY = "IAll"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = ("float32", "float16")
