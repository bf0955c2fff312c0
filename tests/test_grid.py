import pytest
import torch
from helpers import grids, loop_block_view, shape4, shapes
from hypothesis import given
from hypothesis import strategies as st

from elastictrain.config import ConfigError
from elastictrain.constraints.grid import Grid, as4d, block_unview, block_view, coarser


@given(st.data())
def test_block_view_matches_loop_reference_and_inverts(data):
    shape = data.draw(shapes())
    parts = Grid(**data.draw(grids(shape))).parts(shape4(shape))
    x = torch.arange(torch.Size(shape4(shape)).numel(), dtype=torch.float32).reshape(shape4(shape))
    rows = block_view(x, parts)
    assert torch.equal(rows, loop_block_view(x, parts))
    assert torch.equal(block_unview(rows, x.shape, parts), x)


def test_named_units_and_parts():
    assert Grid.named("kernel").parts((8, 4, 3, 3)) == (8, 4, 1, 1)
    assert Grid.named("filter").parts((8, 4, 3, 3)) == (8, 1, 1, 1)
    assert Grid.named("channel").parts((8, 4, 3, 3)) == (1, 4, 1, 1)
    assert Grid.named("element").parts((8, 4, 3, 3)) == (8, 4, 3, 3)
    assert Grid(filter=4, channel=2).parts((8, 4, 3, 3)) == (4, 2, 1, 1)


def test_grid_that_does_not_divide_names_axis_and_tensor():
    with pytest.raises(ConfigError, match=r"channel: 4 parts do not divide the channel axis of conv1 \(size 3\)"):
        Grid(channel=4).parts((64, 3, 3, 3), "conv1")


@pytest.mark.parametrize("bad", [0, -1, "some", 2.5, True])
def test_bad_part_values(bad):
    with pytest.raises(ConfigError, match="filter: must be"):
        Grid(filter=bad)


def test_as4d_and_coarser():
    assert as4d(torch.zeros(3, 5)).shape == (3, 5, 1, 1)
    with pytest.raises(ValueError):
        as4d(torch.zeros(3))
    assert coarser((2, 1, 1, 1), (8, 4, 1, 1)) and not coarser((3, 1, 1, 1), (8, 4, 1, 1))
