"""``dagnn.Balance_loss``: GM-SOP's load-balancing loss on the gating weights
(``+dagnn/Balance_loss.m``).

Input: the gating tuple (its first element, the softmax weights s, ``K x N``).
Output value: the tuple ``(loss 1x1, RSD 1x1, w_sum K x 1)`` with
``w_sum = sum_n s(:, n)``, ``RSD = std(w_sum) / mean(w_sum)`` (MATLAB's std, 1/(K-1)),
``loss = loss_weight * RSD^2``.

Backward ignores the incoming derivative (``always_backward``: the engine runs it even
when nothing reaches its output) and returns, for every image n,

    d s(i, n) = 2w / ((K-1) m^2) * w_sum(i) - 2w (1/(K-1) + RSD^2/K) / m,   m = mean(w_sum)

which is exactly the derivative of ``w * RSD^2`` with respect to s(i, n):
``dRSD^2/dw_sum(i) = 2 (w_sum(i) - m) / ((K-1) m^2) - 2 RSD^2 / (K m)``, and the two forms
are equal term by term. K is the number of rows of s (the original uses its ``CM_num``
property, the same number in every model it builds). Unlike the original, the
derivative does not depend on ``conserveMemory``.
"""
from pydagnn.backend import get_array_module
from pydagnn.layer import Layer, register
from pydagnn.layers._common import first_value

__all__ = ['balance_loss_forward', 'balance_loss_forward_synced', 'balance_loss_backward', 'Balance_loss']


def balance_loss_forward(s, loss_weight=100):
    """``(loss (1, 1), rsd (1, 1), w_sum (K, 1))`` in s's dtype."""
    if s.ndim != 2:
        raise ValueError(f'Balance_loss: expected the K x N gating weights, got shape {s.shape}')
    K = s.shape[0]
    if K < 2:
        raise ValueError(f'Balance_loss: needs at least 2 CMs, got {K}')
    return _from_w_sum(s.sum(axis=1, keepdims=True), loss_weight, s.dtype)


def _from_w_sum(w_sum, loss_weight, dtype):
    m = w_sum.mean()
    rsd = (w_sum.std(ddof=1) / m).reshape(1, 1).astype(dtype, copy=False)
    loss = (loss_weight * rsd * rsd).astype(dtype, copy=False)
    return loss, rsd, w_sum


def balance_loss_forward_synced(s, loss_weight, batch_sum):
    """:func:`balance_loss_forward` of the whole data-parallel batch: the K per-CM sums
    of this rank's images are summed over the ranks by ``batch_sum`` (a function on a
    (K,) array) first, so every rank gets the loss of the global batch; the backward
    (:func:`balance_loss_backward` with the returned ``rsd``, ``w_sum``) then gives this
    rank's images their share of its derivative."""
    if s.ndim != 2 or s.shape[0] < 2:
        raise ValueError(f'Balance_loss: expected the K x N gating weights (K >= 2), got shape {s.shape}')
    w_sum = batch_sum(s.sum(axis=1)).reshape(-1, 1)
    return _from_w_sum(w_sum, loss_weight, s.dtype)


def balance_loss_backward(s, loss_weight=100, rsd=None, w_sum=None):
    """d(loss)/ds, ``K x N`` (the same column for every image)."""
    xp = get_array_module(s)
    if rsd is None or w_sum is None:
        _, rsd, w_sum = balance_loss_forward(s, loss_weight)
    K, N = s.shape
    m = w_sum.mean()
    w = loss_weight
    col = w_sum * (2 * w / ((K - 1) * m * m)) - 2 * w * (1.0 / (K - 1) + rsd * rsd / K) / m
    col = col.astype(s.dtype, copy=False).reshape(K, 1)
    return xp.asfortranarray(xp.broadcast_to(col, (K, N)))


@register('dagnn.Balance_loss')
class Balance_loss(Layer):
    """Load-balancing loss; ``loss_weight`` (w, 100 in the models) and ``CM_num`` stored
    as the original. Input: the gating tuple; output value ``(loss, RSD, w_sum)``."""
    properties = {'loss_weight': 100, 'CM_num': 16}
    is_loss = True
    always_backward = True
    #: the trainer reads the value after eval for the ``BalanceLoss`` statistic
    trainer_reads = (0,)

    def train_stats(self, outputs):
        """``BalanceLoss``: the loss (the value's first element), averaged by the trainer."""
        return {} if outputs[0] is None else {'BalanceLoss': outputs[0]}

    def _w(self):
        return float(first_value(self.loss_weight))

    def forward(self, inputs, params):
        g = inputs[0]
        s = g[0] if isinstance(g, (tuple, list)) else g
        if self.batch_synced and self.mode != 'test':
            return [balance_loss_forward_synced(s, self._w(), self.batch_sum)]
        return [balance_loss_forward(s, self._w())]

    def backward(self, inputs, params, der_outputs, outputs=None):
        g = inputs[0]
        s = g[0] if isinstance(g, (tuple, list)) else g
        rsd = w_sum = None
        if outputs is not None and outputs[0] is not None:
            _, rsd, w_sum = outputs[0]
        elif self.batch_synced and self.mode != 'test':
            _, rsd, w_sum = balance_loss_forward_synced(s, self._w(), self.batch_sum)
        return [balance_loss_backward(s, self._w(), rsd, w_sum)], []

    def get_output_sizes(self, input_sizes):
        """``[(1, 1)]``: the loss, the value's first element."""
        return [(1, 1)]
