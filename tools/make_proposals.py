#!/usr/bin/env python
"""
Write detectron2's precomputed-proposal file (``DATASETS.PROPOSAL_FILES_TRAIN / _TEST``; the
format of ``load_proposals_into_dataset``: ids, boxes XYXY_ABS, objectness_logits, each image's
boxes sorted by objectness) for any registered dataset, from

- the project's selective search ranked by superpixel straddling (default; no MATLAB, ~10
  images/s on 2 cores at 256 px, see ``wsis_d2.data.proposals``), or
- MCG / COB per-image ``.mat`` files (``--mcg-dir``: ``<image file stem>.mat`` with ``boxes`` or
  ``bboxes`` 1-based [y1 x1 y2 x2] and ``scores``), or
- Fast R-CNN's selective-search ``.mat`` (``--fast-rcnn-mat``: ``images`` and ``boxes``, no
  scores; the order of the file is kept, as a rank score), or
- a Fast R-CNN / wetectron / detectron2 proposal pickle (``--pickle``), checked and re-sorted.

Every image of the dataset must get proposals; a missing one, a box outside its image or an array
of the wrong shape stops the run with an error naming the file and the image id.

    python tools/make_proposals.py --dataset wsis_synth_train --output proposals/train.pkl
    python tools/make_proposals.py --dataset voc_2012_train --mcg-dir MCG-VOC2012/ \\
        --output proposals/voc_2012_train_mcg.pkl
"""

import argparse
import json
import logging
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from detectron2.data import DatasetCatalog  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

import wsis_d2  # noqa: E402,F401  (registers the datasets)
from wsis_d2.data.proposals import (  # noqa: E402
    SelectiveSearchProposals,
    check_proposals,
    load_fast_rcnn_mat,
    load_mcg_mat,
    load_proposal_file,
    save_proposal_file,
    score_to_logit,
)
from wsis_d2.ccgr.stages import make_proposal_file  # noqa: E402

logger = logging.getLogger("make_proposals")


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def from_mcg(dicts, folder, output):
    ids, boxes, logits = [], [], []
    for d in dicts:
        path = os.path.join(folder, _stem(d["file_name"]) + ".mat")
        if not os.path.isfile(path):
            raise ValueError(f"{folder}: no MCG file {os.path.basename(path)} for image id "
                             f"{d['image_id']!r} ({d['file_name']})")
        b, s = load_mcg_mat(path)
        ids.append(d["image_id"])
        boxes.append(b)
        logits.append(score_to_logit(np.clip(s, 0.0, 1.0)))
    save_proposal_file(output, ids, boxes, logits)


def from_fast_rcnn_mat(dicts, path, output):
    names, arrays = load_fast_rcnn_mat(path)
    index = {n: i for i, n in enumerate(names)}
    ids, boxes, logits = [], [], []
    for d in dicts:
        stem = _stem(d["file_name"])
        if stem not in index:
            raise ValueError(f"{path}: no proposals for image id {d['image_id']!r} ({stem})")
        b = arrays[index[stem]]
        ids.append(d["image_id"])
        boxes.append(b)
        # no scores: the file's order (selective search's ranking) as a decreasing logit
        logits.append(-np.arange(len(b), dtype=np.float32))
    save_proposal_file(output, ids, boxes, logits)


def from_pickle(dicts, path, output):
    data = load_proposal_file(path)
    # detectron2 matches ids as strings (load_proposals_into_dataset): so do we
    by_str = {str(i): k for k, i in enumerate(data["ids"])}
    ids, boxes, logits = [], [], []
    for d in dicts:
        k = by_str.get(str(d["image_id"]))
        if k is None:
            raise ValueError(f"{path}: no proposals for image id {d['image_id']!r} "
                             f"({d['file_name']})")
        ids.append(d["image_id"])
        boxes.append(data["boxes"][k])
        logits.append(data["objectness_logits"][k])
    save_proposal_file(output, ids, boxes, logits)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", required=True, help="registered dataset name")
    parser.add_argument("--output", required=True, help="proposal pickle to write")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--mcg-dir", help="folder of MCG / COB per-image .mat files")
    source.add_argument("--fast-rcnn-mat", help="Fast R-CNN selective-search .mat file")
    source.add_argument("--pickle", help="Fast R-CNN / wetectron / detectron2 proposal pickle")
    parser.add_argument("--min-size", type=int, default=256,
                        help="selective search: shorter image side while segmenting (0: native)")
    parser.add_argument("--max-proposals", type=int, default=2000, help="boxes kept per image")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="selective search: parallel processes")
    parser.add_argument("--full-decode", action="store_true",
                        help="selective search: decode large JPEGs at full size (default: at "
                        "1/2-1/8 by libjpeg where still 2 x --min-size, as INPUT.REDUCED_DECODE)")
    args = parser.parse_args(argv)
    setup_logger(name="wsis_d2")
    setup_logger(name="make_proposals")
    dicts = DatasetCatalog.get(args.dataset)
    if args.mcg_dir:
        from_mcg(dicts, args.mcg_dir, args.output)
    elif args.fast_rcnn_mat:
        from_fast_rcnn_mat(dicts, args.fast_rcnn_mat, args.output)
    elif args.pickle:
        from_pickle(dicts, args.pickle, args.output)
    else:
        generator = SelectiveSearchProposals(
            min_size=args.min_size, max_proposals=args.max_proposals
        )
        stats = make_proposal_file(
            args.output,
            dicts,
            generator,
            workers=args.workers,
            decode_short_side=0 if args.full_decode else args.min_size,
        )
        logger.info("selective search: %s", json.dumps(stats))
    check_proposals(args.output, load_proposal_file(args.output), dicts)
    logger.info(f"wrote {args.output} ({len(dicts)} images of {args.dataset})")


if __name__ == "__main__":
    main()
