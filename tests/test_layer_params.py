"""Param roles and shape checks as block methods (what the loader asks a block)."""
import numpy as np
import pytest

from pydagnn.layer import Layer, check_filter_params, shape_by_role
from pydagnn.layers.bnorm import BatchNorm
from pydagnn.layers.conv import Conv
from pydagnn.layers.gating import H_x


def test_shape_by_role():
    assert shape_by_role(np.zeros((3, 3)), 'filter').shape == (3, 3, 1, 1)
    assert shape_by_role(np.zeros((1, 5)), 'vector').shape == (5,)
    assert shape_by_role(np.zeros((4, 2)), 'moments').flags.f_contiguous
    with pytest.raises(ValueError, match='at most 4 dims'):
        shape_by_role(np.zeros((1,) * 5), 'filter')
    with pytest.raises(ValueError, match='expected a vector'):
        shape_by_role(np.zeros((2, 3)), 'vector')
    with pytest.raises(ValueError, match='C x 2'):
        shape_by_role(np.zeros((4, 3)), 'moments')
    with pytest.raises(ValueError, match='2-D matrix'):
        shape_by_role(np.zeros(4), 'matrix')
    with pytest.raises(ValueError, match='unknown param role'):
        shape_by_role(np.zeros(4), 'tensor')


def test_default_block_leaves_params_alone():
    v = np.zeros((2, 3, 4))
    out = Layer().shape_param(0, v)
    assert out.shape == v.shape and out.flags.f_contiguous
    Layer().check_param_shapes([v], ['p'])     # no check


def test_conv_block_params():
    c = Conv(size=[3, 3, 2, 4])
    assert c.shape_param(0, np.zeros((3, 3, 2))).shape == (3, 3, 2, 1)
    assert c.shape_param(1, np.zeros((4, 1))).shape == (4,)
    c.check_param_shapes([np.zeros((3, 3, 2, 4)), np.zeros(4)], ['f', 'b'])
    with pytest.raises(ValueError, match=r"'f' has shape \(3, 3, 2, 5\).*\[3, 3, 2, 4\]"):
        c.check_param_shapes([np.zeros((3, 3, 2, 5))], ['f'])
    with pytest.raises(ValueError, match="'b' has 3 elements.*4 output channels"):
        c.check_param_shapes([np.zeros((3, 3, 2, 4)), np.zeros(3)], ['f', 'b'])


def test_filter_check_for_a_transposed_bank():
    # ConvTranspose filters are FH x FW x Cout x Cin: the biases count axis 2
    check_filter_params([np.zeros((2, 2, 3, 5)), np.zeros(3)], ['f', 'b'], [2, 2, 3, 5], 2)
    with pytest.raises(ValueError, match='3 output channels'):
        check_filter_params([np.zeros((2, 2, 3, 5)), np.zeros(5)], ['f', 'b'], [0, 0, 0, 0], 2)


def test_batchnorm_and_hx_block_params():
    bn = BatchNorm(numChannels=3)
    assert bn.shape_param(2, np.zeros((3, 2))).shape == (3, 2)
    with pytest.raises(ValueError, match='channel counts disagree: numChannels 3, g 4'):
        bn.check_param_shapes([np.zeros(4), np.zeros(3), None], ['g', 'b', 'm'])
    h = H_x(size=[6, 2])
    with pytest.raises(ValueError, match='2-D matrix'):
        h.shape_param(1, np.zeros(6))
    with pytest.raises(ValueError, match=r"'wn' has shape \(6, 3\)"):
        h.check_param_shapes([np.zeros((6, 2)), np.zeros((6, 3))], ['wg', 'wn'])
