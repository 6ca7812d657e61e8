"""ImageNet preprocessing (placeholder: being written)."""
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def preprocess(images, **kwargs):
    raise NotImplementedError


def preprocess_ref(images, **kwargs):
    raise NotImplementedError
