"""
The class names of a registered dataset. Some registrations (COCO jsons that do not exist yet at
registration time, user loaders) fill ``thing_classes`` only when their split is loaded, so a
reader that needs them before loading the split goes through :func:`thing_classes_of`.
"""

from typing import List, Optional

from detectron2.data import DatasetCatalog, MetadataCatalog

__all__ = ["thing_classes_of"]


def thing_classes_of(dataset_name: str, required: bool = True) -> Optional[List[str]]:
    """
    ``MetadataCatalog.get(dataset_name).thing_classes``, loading the split first
    (``DatasetCatalog.get``) when the metadata does not have them yet.

    Args:
        dataset_name: a registered dataset.
        required: raise when the dataset has no ``thing_classes`` even after loading; False:
            return None then.

    Returns:
        the class names (a list), or None (``required=False`` only).

    Raises:
        ValueError: an unregistered name, or (``required``) no ``thing_classes``.
    """
    if dataset_name not in DatasetCatalog.list():
        raise ValueError(f"dataset {dataset_name!r} is not registered in DatasetCatalog")
    meta = MetadataCatalog.get(dataset_name)
    if not hasattr(meta, "thing_classes"):
        DatasetCatalog.get(dataset_name)  # loaders such as load_coco_counts_json fill it
    names = getattr(meta, "thing_classes", None)
    if names is None and required:
        raise ValueError(
            f"metadata of dataset '{dataset_name}' has no field 'thing_classes', also after "
            "loading the split"
        )
    return None if names is None else list(names)
