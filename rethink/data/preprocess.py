"""Image files as the model gets them: one preprocessing for training, val/test and task=predict, and
its description for task=export's preprocess.json.

    decode   load_image(path, stored_size): RGB, a JPEG at its strongest DCT reduction that keeps the
             shorter side >= stored_size, then the shorter side down to stored_size (PIL bilinear)
    (a pack holds the files' bytes as they are: data/packed.py)
    cache    (optional) the decoded pixels, kept as they are: the same tensors with or without it
    then     the train transform (random crop and flip) or the eval transform (resize + centre crop)
"""

from pathlib import Path
from typing import Sequence

from .cache import ImageCache
from .datasets import FileImages, PackedImages
from .packed import Pack
from .transforms import eval_resize, eval_transform, stored_size, train_transform


def file_images(
    root: Path,
    paths: Sequence[str],
    labels: Sequence[int],
    model_cfg,
    data_cfg,
    *,
    train: bool,
    cache: ImageCache | None = None,
    digests: Sequence[str] | None = None,
    sizes: Sequence[tuple[int, int]] | None = None,
    pack: Pack | None = None,
) -> FileImages:
    """Files under `root` (or these files' bytes in `pack`), decoded at `stored_size`, with the train or the eval
    transform."""
    transform = train_transform(model_cfg, data_cfg) if train else eval_transform(model_cfg, data_cfg)
    side = stored_size(model_cfg, data_cfg)
    if pack is not None:
        return PackedImages(pack.locations(list(paths)), paths, labels, transform, side, cache, digests, sizes)
    return FileImages(root, paths, labels, transform, side, cache, digests, sizes)


def eval_images(paths: Sequence[str | Path], model_cfg, data_cfg) -> FileImages:
    """Any image files (unlabelled: label -1), each item exactly the tensor the val/test data sets give
    for the same file: what task=predict feeds the model. A file that is not a readable image raises
    a UserError when its item is asked for."""
    return file_images(Path(), [str(p) for p in paths], [-1] * len(paths), model_cfg, data_cfg, train=False)


def describe_eval_preprocessing(model_cfg, data_cfg) -> dict:
    """What `eval_images` does to a file, for someone who feeds an exported model without rethink."""
    side = stored_size(model_cfg, data_cfg)
    return {
        "decode": "RGB; EXIF orientation applied; transparent pixels composited onto white; 16-bit samples scaled "
        f"to 8 bits; a JPEG is decoded at the strongest DCT reduction (1/2, 1/4, 1/8; PIL's draft) that keeps "
        f"its shorter side at least {side} px",
        "stored_side": side,
        "stored_resize": f"when the decoded shorter side is above {side} px: down to {side} px (aspect kept, sides rounded), "
        "PIL Image.resize bilinear, reducing_gap=None (antialiased); never enlarged",
        "resize": eval_resize(model_cfg, data_cfg),
        "interpolation": "shorter side to `resize` px (aspect kept), torchvision.transforms.v2.Resize on the uint8 "
        "tensor: bilinear, antialias=True",
        "crop": model_cfg.eval_size,
        "crop_position": "centre (torchvision.transforms.v2.CenterCrop)",
        "reference": "rethink.data.eval_images(paths, model_cfg, data_cfg): what the val/test splits and task=predict use",
    }
