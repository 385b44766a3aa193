"""wsis_d2.utils.progress: lines with done/total and an ETA, at most every every_s seconds."""

import logging
import unittest
from unittest import mock

from wsis_d2.utils import progress as progress_module
from wsis_d2.utils.progress import progress


class TestProgress(unittest.TestCase):
    def _run(self, items, ticks, **kwargs):
        """Iterate with a fake clock: ``ticks`` are the perf_counter values, one per call."""
        with mock.patch.object(progress_module.time, "perf_counter", side_effect=ticks):
            with self.assertLogs("wsis_d2.utils.progress", logging.INFO) as logs:
                out = list(progress(items, "stage", every_s=10.0, **kwargs))
                logging.getLogger("wsis_d2.utils.progress").info("end")  # assertLogs needs one
        return out, [r.getMessage() for r in logs.records][:-1]

    def test_eta_from_len_and_final_line(self):
        # start 0; items done at 4, 12, 16, 30 s: lines after item 2 (12 s) and item 4 (30 s)
        out, lines = self._run([1, 2, 3, 4], [0.0, 4.0, 12.0, 16.0, 30.0, 30.0], unit="batch")
        self.assertEqual(out, [1, 2, 3, 4])
        self.assertEqual(
            lines,
            [
                "stage: done 2/4. 6.0000 s/batch. ETA=0:00:12",
                "stage: done 4/4. 7.5000 s/batch. ETA=0:00:00",
                "stage: finished 4 batch in 0:00:30 (7.5000 s/batch)",
            ],
        )

    def test_without_len_no_eta_and_quiet_when_fast(self):
        _, lines = self._run(iter([1, 2]), [0.0, 11.0, 12.0, 12.0])
        self.assertEqual(lines[0], "stage: done 1. 11.0000 s/it. elapsed 0:00:11")
        _, lines = self._run([1, 2], [0.0, 1.0, 2.0, 2.0])
        self.assertEqual(lines, [])

    def test_bad_every_s(self):
        with self.assertRaisesRegex(ValueError, "'every_s' must be > 0, got 0"):
            list(progress([1], "stage", every_s=0))


if __name__ == "__main__":
    unittest.main()
