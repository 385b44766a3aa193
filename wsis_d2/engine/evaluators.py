"""Evaluator selection by the dataset's ``evaluator_type`` (MetadataCatalog)."""

import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluators, PascalVOCDetectionEvaluator

from ..data.datasets import thing_classes_of
from ..data.image_labels import is_count_only
from ..evaluation import CountingEvaluator, DensityEvaluator, FastCOCOEvaluator, InstanceAPEvaluator
from ..evaluation.gt_cache import cached_ground_truth

__all__ = ["build_evaluator"]


def _count_only_images(dataset_name: str):
    """File names of the images of ``dataset_name`` with counted objects and no annotations."""
    # cached: the check loads the split, and the trainer builds evaluators at every evaluation
    return cached_ground_truth(
        "count_only",
        dataset_name,
        lambda: [
            d.get("file_name", "?") for d in DatasetCatalog.get(dataset_name) if is_count_only(d)
        ],
    )


def build_evaluator(cfg, dataset_name: str, output_folder: str = None):
    """
    The evaluator(s) of ``dataset_name`` by its metadata's ``evaluator_type``:

    - "wsis_instance": :class:`InstanceAPEvaluator` (mAP^r / mAP^b), :class:`CountingEvaluator`
      and, with ``TEST.WSIS_COCO_EVAL``, :class:`FastCOCOEvaluator`;
    - "counting": :class:`CountingEvaluator`; "density": :class:`DensityEvaluator`;
    - "coco": :class:`FastCOCOEvaluator`; "pascal_voc": detectron2's VOC box AP.

    Counting errors are reported next to the mean-count baseline of ``DATASETS.TRAIN[0]`` when it
    has the same classes. Raises ValueError naming the dataset for any other type.
    """
    if output_folder is None:
        output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
    evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", None)
    evaluators = []
    baseline = cfg.DATASETS.TRAIN[0] if len(cfg.DATASETS.TRAIN) else None
    # thing_classes_of: some registrations fill the classes only when the split is loaded
    if baseline is not None and thing_classes_of(baseline, False) != thing_classes_of(
        dataset_name, False
    ):
        baseline = None
    if evaluator_type == "wsis_instance":
        # now, not after a whole training's first evaluation: mAP needs every object's mask
        count_only = _count_only_images(dataset_name)
        if count_only:
            raise ValueError(
                f"dataset {dataset_name!r}: {len(count_only)} images (e.g. {count_only[0]}) "
                "have counted objects without annotations, which mAP cannot score; register it "
                "with metadata evaluator_type 'counting' to score counts alone"
            )
        # image-level-supervised models add counts; mask models are scored by both protocols
        evaluators.append(InstanceAPEvaluator(dataset_name, output_dir=output_folder))
        evaluators.append(
            CountingEvaluator(dataset_name, output_dir=output_folder, baseline_dataset=baseline)
        )
        if cfg.TEST.WSIS_COCO_EVAL:
            # detectron2's compiled COCOeval, else faster-coco-eval, else pycocotools
            evaluators.append(FastCOCOEvaluator(dataset_name, output_dir=output_folder))
    elif evaluator_type == "counting":
        evaluators.append(
            CountingEvaluator(dataset_name, output_dir=output_folder, baseline_dataset=baseline)
        )
    elif evaluator_type == "density":
        evaluators.append(DensityEvaluator(dataset_name, output_dir=output_folder))
    elif evaluator_type == "coco":
        evaluators.append(FastCOCOEvaluator(dataset_name, output_dir=output_folder))
    elif evaluator_type == "pascal_voc":
        evaluators.append(PascalVOCDetectionEvaluator(dataset_name))
    else:
        raise ValueError(
            f"dataset {dataset_name!r}: no evaluator for evaluator_type={evaluator_type!r}"
        )
    return evaluators[0] if len(evaluators) == 1 else DatasetEvaluators(evaluators)
