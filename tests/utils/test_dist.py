"""wsis_d2.utils.dist in one process: the model inside a wrapper, the mean over processes."""

import unittest

import torch

from wsis_d2.utils.dist import mean_over_processes, unwrap


class TestDist(unittest.TestCase):
    def test_unwrap_returns_the_inner_module(self):
        net = torch.nn.Linear(2, 3)
        self.assertIs(unwrap(net), net)
        self.assertIs(unwrap(torch.nn.DataParallel(net, device_ids=[])), net)

    def test_mean_over_processes_is_the_value_in_one(self):
        x = torch.tensor([3, 4])
        self.assertTrue(torch.equal(mean_over_processes(x), torch.tensor([3.0, 4.0])))


if __name__ == "__main__":
    unittest.main()
