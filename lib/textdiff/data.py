"""Reading images, volumes, label masks and LViT-format folders; writing label maps with the input's geometry."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")
MAX_PIXELS = 64_000_000  # refuse larger images before decoding them (decompression bombs)


class ImageReadError(ValueError):
    pass


@dataclass
class Image:
    """Pixels plus the SimpleITK geometry they came with.

    ``array`` is (H, W, C) for 2D images (C = 1 for grey) and (D, H, W) for volumes.
    """

    array: np.ndarray
    reference: sitk.Image  # geometry (size, spacing, origin, direction) of the source
    is_volume: bool

    @property
    def size_hw(self) -> tuple[int, int]:
        return tuple(self.array.shape[1:3] if self.is_volume else self.array.shape[:2])


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _dicom_series(folder: Path) -> list[str]:
    reader = sitk.ImageSeriesReader()
    ids = reader.GetGDCMSeriesIDs(str(folder))
    if not ids:
        raise ImageReadError(f"{folder} is a folder but holds no DICOM series")
    return list(reader.GetGDCMSeriesFileNames(str(folder), ids[0]))


def read_sitk(path: str | Path, max_pixels: int = MAX_PIXELS) -> sitk.Image:
    """Read a 2D image, a volume file or a DICOM series folder, checking the header before decoding."""
    path = Path(path)
    if not path.exists():
        raise ImageReadError(f"{path} does not exist")
    if path.is_dir():
        files = _dicom_series(path)
        image = sitk.ReadImage(files)
    else:
        if path.stat().st_size == 0:
            raise ImageReadError(f"{path.name} is empty (0 bytes)")
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            raise ImageReadError(f"{path.name} is not a readable image (unknown or corrupt format)") from None
        pixels = int(np.prod(reader.GetSize())) * reader.GetNumberOfComponents()
        if pixels > max_pixels:
            raise ImageReadError(f"{path.name} has {pixels:,} pixel values, above the limit of {max_pixels:,}")
        try:
            image = reader.Execute()
        except RuntimeError:
            raise ImageReadError(f"{path.name} could not be decoded (truncated or corrupt)") from None
    return image


def read_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> Image:
    image = read_sitk(path, max_pixels)
    array = sitk.GetArrayFromImage(image)
    dims = image.GetDimension()
    if dims == 3 and image.GetSize()[2] == 1 and image.GetNumberOfComponentsPerPixel() > 1:
        # e.g. an RGB png saved as a 1-slice volume: treat as 2D
        array = array[0]
        dims = 2
    if dims == 2:
        if array.ndim == 2:
            array = array[..., None]
        if array.shape[-1] == 4:  # RGBA: alpha carries no tissue information
            array = array[..., :3]
        is_volume = False
    elif dims == 3:
        if image.GetNumberOfComponentsPerPixel() > 1:
            raise ImageReadError(f"{Path(path).name}: multi-component volumes are not supported")
        is_volume = True
    else:
        raise ImageReadError(f"{Path(path).name}: {dims}-D images are not supported (2D or 3D only)")
    if not np.issubdtype(array.dtype, np.number):
        raise ImageReadError(f"{Path(path).name}: unsupported pixel type {array.dtype}")
    if not np.isfinite(array).all():
        raise ImageReadError(f"{Path(path).name} contains NaN or infinite values")
    return Image(array, image, is_volume)


def normalize_mask(array: np.ndarray, num_classes: int = 2, name: str = "mask") -> np.ndarray:
    """A label map (H, W) or (D, H, W) of uint8 class indices from {0,255}, {0,1} or 0..C-1 data."""
    array = np.asarray(array)  # colour masks are reduced to one channel by read_mask, which knows the pixel type
    if not np.issubdtype(array.dtype, np.integer):
        if not np.isfinite(array).all() or not np.all(np.mod(array, 1) == 0):
            raise ValueError(f"{name} is not a label map: it holds non-integer values")
    values = set(np.unique(array).tolist())
    if values <= {0, 255}:
        return (array > 0).astype(np.uint8)
    if values <= set(range(num_classes)):
        return array.astype(np.uint8)
    raise ValueError(f"{name} is not a label map: values {sorted(values)[:8]} are not in 0..{num_classes - 1} "
                     "(or {0, 255})")


def read_mask(path: str | Path, num_classes: int = 2) -> np.ndarray:
    """Read a label file (.png {0,255}/{0,1}, .nii.gz from Slicer with a trailing size-1 dimension, ...)."""
    image = read_sitk(path)
    array = sitk.GetArrayFromImage(image)
    if image.GetNumberOfComponentsPerPixel() > 1 and array.ndim == image.GetDimension() + 1:
        array = array[..., 0]
    array = np.squeeze(array) if array.ndim > 2 and 1 in array.shape[:-2] else array
    return normalize_mask(array, num_classes, Path(path).name)


@dataclass
class Sample:
    image: Path
    mask: Path | None
    report: str | None

    @property
    def name(self) -> str:
        return self.image.name


def _find_image(img_dir: Path, mask_name: str) -> Path | None:
    candidates = [mask_name]
    if mask_name.startswith("mask_"):
        candidates.append(mask_name[len("mask_"):])
    for name in candidates:
        if (img_dir / name).is_file():
            return img_dir / name
        stem = Path(name).stem
        for suffix in IMAGE_SUFFIXES:
            if (img_dir / (stem + suffix)).is_file():
                return img_dir / (stem + suffix)
    return None


def read_lvit(folder: str | Path, require_masks: bool = True, masks: str = "labelcol") -> list[Sample]:
    """Samples of an LViT split folder: ``img/``, ``labelcol/``, ``<Split>_text.xlsx`` (Image = mask file name).
    ``masks``: another mask folder beside ``img/`` (e.g. class-index masks of several structures)."""
    folder = Path(folder)
    if not masks or Path(masks).name != masks or masks in (".", ".."):
        raise ValueError(f"the mask folder must be a folder name beside img/, got {masks!r}")
    img_dir, mask_dir = folder / "img", folder / masks
    if not img_dir.is_dir():
        raise FileNotFoundError(f"{folder} is not an LViT folder: {img_dir} is missing")
    sheets = sorted(folder.glob("*_text.xlsx"))
    samples: list[Sample] = []
    if sheets:
        import openpyxl

        book = openpyxl.load_workbook(sheets[0], read_only=True)
        rows = list(book.active.iter_rows(values_only=True))
        book.close()
        header = [str(h).strip() if h is not None else "" for h in rows[0]]
        if "Image" not in header or "Description" not in header:
            raise ValueError(f"{sheets[0].name} needs columns 'Image' and 'Description', found {header}")
        col_image, col_text = header.index("Image"), header.index("Description")
        missing = []
        for row in rows[1:]:
            if row[col_image] is None:
                continue
            mask_name = str(row[col_image]).strip()
            image = _find_image(img_dir, mask_name)
            mask = mask_dir / mask_name if (mask_dir / mask_name).is_file() else None
            if image is None or (require_masks and mask is None):
                missing.append(mask_name)
                continue
            report = row[col_text]
            samples.append(Sample(image, mask, str(report) if report is not None else None))
        if missing:
            raise FileNotFoundError(f"{len(missing)} rows of {sheets[0].name} have no image/mask file, "
                                    f"e.g. {missing[:3]}")
    else:  # no sheet: every image, masks by the same name, no reports
        for image in sorted(p for p in img_dir.iterdir() if _suffix(p) in IMAGE_SUFFIXES):
            mask = mask_dir / image.name
            if require_masks and not mask.is_file():
                raise FileNotFoundError(f"no mask {mask} for {image.name}")
            samples.append(Sample(image, mask if mask.is_file() else None, None))
    if not samples:
        raise ValueError(f"{folder} holds no samples")
    return samples


def label_to_sitk(label: np.ndarray, reference: Image) -> sitk.Image:
    """A label array with the reference image's geometry (2D: (H, W); volume: (D, H, W))."""
    out = sitk.GetImageFromArray(label.astype(np.uint8) if label.dtype == bool else label)
    ref = reference.reference
    if ref.GetDimension() == out.GetDimension():
        out.CopyInformation(ref)
    else:  # a 2D image stored as a one-slice volume
        out.SetSpacing(ref.GetSpacing()[:2])
        out.SetOrigin(ref.GetOrigin()[:2])
    return out


# JPEG is lossy (it would blur label values) and a DICOM label needs metadata we do not have
LABEL_VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
LABEL_IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".bmp")


def check_label_path(path: str | Path, is_volume: bool) -> None:
    """Refuse an output name no label can be written to, before any work is spent on the label."""
    suffix = _suffix(Path(path))
    allowed = (() if is_volume else LABEL_IMAGE_SUFFIXES) + LABEL_VOLUME_SUFFIXES
    if suffix not in allowed:
        kind = "a volume's" if is_volume else "a 2D"
        raise ValueError(f"{kind} label cannot be written as {suffix or 'a file without extension'} ({path}); "
                         f"use one of {', '.join(allowed)}")


def write_label(label: np.ndarray, reference: Image, path: str | Path, scale_255: bool = False) -> Path:
    """Write a label map: PNG/TIF for 2D inputs, NIfTI/NRRD for volumes, with the input's geometry."""
    path = Path(path)
    check_label_path(path, reference.is_volume)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    suffix = _suffix(path)
    values = label * 255 if scale_255 else label
    sitk.WriteImage(label_to_sitk(values, reference), str(path), useCompression=suffix in (".nii.gz", ".nrrd"))
    return path
