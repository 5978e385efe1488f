"""Launchers that run one step body on one device, over a device mesh, or with pmap.

A step body is a pure function ``step_fn(state, batch, *, axis_name) -> outputs`` that
averages its gradients and metrics with ``lax.pmean(..., axis_name)`` when ``axis_name`` is
not ``None`` (e.g. ``functools.partial(jaxrm.steps.rm_step.reward_model_step, apply_fn=...,
loss_fn=..., optimizer=...)``). Every output must be identical on all devices (averaged or
gathered). :func:`make_parallel_step` turns it into a :class:`ParallelStep` for one of:

* ``'jit'``: ``jax.jit`` on one device, ``axis_name=None``.
* ``'shard_map'`` (default with several devices): ``jax.shard_map`` over a 1-D mesh
  ``(axis_name,)``; the state is replicated (``P()``), the batch is split along axis 0
  (``P(axis_name)``).
* ``'pmap'``: ``jax.pmap``; the state carries a leading device axis, the batch is reshaped
  to ``[devices, per_device, ...]``.
* ``'fsdp'``: plain ``jax.jit`` with ``axis_name=None`` over a mesh: large parameter and
  optimizer-state arrays are sharded over the mesh axis (:func:`fsdp_shardings`), the batch is
  split along axis 0, and XLA (GSPMD) inserts the collectives. For models too large to
  replicate.

The training loop is the same in every mode::

  pstep = make_parallel_step(step_fn, mode="auto")
  state = pstep.put_state(create_train_state(params, optimizer, key))
  for batch in batches:                       # host batches, global batch size
    state, metrics = pstep(state, pstep.shard_batch(batch))
    metrics = pstep.unreplicate(metrics)      # scalars
  host_state = pstep.unreplicate(state)       # e.g. to checkpoint

The state argument is donated (``donate=True``): after ``pstep(state, batch)`` the old
``state`` must not be used. ``put_state`` always copies, so the caller's original arrays stay
valid.

Mesh axes are created as ``AxisType.Auto`` (``jax.make_mesh`` defaults to ``Explicit`` in jax
0.10, which makes ``shard_map`` reject inputs not already laid out per its ``in_specs`` and
makes sharded-parameter matmuls ambiguous under ``jit``). ``shard_batch``/``put_state`` still
lay the inputs out exactly as the step expects, so no resharding happens at call time.

Under ``shard_map`` the default ``check_vma=False`` gives pmap semantics (each device
differentiates its own copy of the parameters, the body averages explicitly). With
``check_vma=True`` JAX checks that outputs are replicated, but the gradient with respect to
a replicated input is then summed over devices implicitly unless the body marks parameters
varying first (``lax.pcast(params, axis_name, to='varying')``, as ``reward_model_step``
does); a pmap-style body that does not would get gradients ``devices`` times too large.

Multi-host (``'shard_map'``/``'fsdp'``): ``shard_batch`` takes the process-local batch and
builds the global array with ``jax.make_array_from_process_local_data``; divisibility is checked
against this process's devices. ``'pmap'`` and ``'jit'`` are single-process launchers here.
"""

from collections.abc import Callable, Sequence
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

MODES = ("auto", "jit", "shard_map", "pmap", "fsdp")


def make_data_mesh(
  *,
  axis_name: str = "data",
  devices: Sequence[jax.Device] | None = None,
) -> Mesh:
  """Returns a 1-D mesh ``(axis_name,)`` over ``devices`` (default: all) with an Auto axis."""
  devices = list(jax.devices() if devices is None else devices)
  return jax.make_mesh(
    (len(devices),), (axis_name,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices
  )


def fsdp_shardings(
  tree: Any,
  mesh: Mesh,
  *,
  axis_name: str = "data",
  min_size: int = 2**16,
) -> Any:
  """Per-leaf ``NamedSharding``: large arrays sharded over ``axis_name``, the rest replicated.

  A leaf with at least ``min_size`` elements is split along its largest dimension that is
  divisible by the size of ``axis_name`` (the first such dimension on ties); other leaves
  (scalars, small biases, PRNG keys, indivisible shapes) are replicated. The rule depends only
  on the shape, so parameters and the optimizer moments of the same shape (Adam ``mu``/``nu``)
  get the same layout — ZeRO-3 / FSDP style when combined with a batch split over the same axis.

  Args:
    tree: pytree of arrays or ``jax.ShapeDtypeStruct`` (e.g. a whole ``TrainState``).
    mesh: device mesh containing ``axis_name``.
    axis_name: mesh axis to shard over.
    min_size: minimum number of elements for a leaf to be sharded.

  Returns:
    A pytree of ``NamedSharding`` with the structure of ``tree``.
  """
  if axis_name not in mesh.shape:
    raise ValueError(f"axis_name {axis_name!r} is not an axis of the mesh {dict(mesh.shape)}")
  n = mesh.shape[axis_name]

  def rule(x):
    shape = tuple(np.shape(x))
    if int(np.prod(shape, dtype=np.int64)) < min_size or not shape:
      return NamedSharding(mesh, P())
    candidates = [d for d in range(len(shape)) if shape[d] % n == 0]
    if not candidates:
      return NamedSharding(mesh, P())
    d = max(candidates, key=lambda i: (shape[i], -i))
    return NamedSharding(mesh, P(*([None] * d + [axis_name])))

  return jax.tree.map(rule, tree)


def shard_params(
  tree: Any,
  mesh: Mesh,
  *,
  axis_name: str = "data",
  min_size: int = 2**16,
) -> Any:
  """Places ``tree`` on ``mesh`` with :func:`fsdp_shardings` (a copy; inputs stay valid)."""
  shardings = fsdp_shardings(tree, mesh, axis_name=axis_name, min_size=min_size)
  return _place_copy(tree, shardings)


@jax.jit
def _copy_arrays(arrays: list[jax.Array]) -> list[jax.Array]:
  return [jnp.copy(x) for x in arrays]


def _place_copy(tree: Any, sharding: Any) -> Any:
  """``jax.device_put`` that never shares a buffer with ``tree``.

  ``may_alias=False`` alone is not enough in jax 0.10: placing a single-device array on a
  replicated ``NamedSharding`` reuses its buffer for the shard on that device, so donating the
  placed state would delete the caller's array. Arrays are therefore copied first: by one
  compiled program when they all live on one device (``jnp.copy`` leaf by leaf compiled a small
  program per distinct leaf shape, a dozen for a reward model's train state).
  """
  leaves, treedef = jax.tree.flatten(tree)
  arrays = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array)]
  if len({d for i in arrays for d in leaves[i].devices()}) == 1:
    for i, x in zip(arrays, _copy_arrays([leaves[i] for i in arrays])):
      leaves[i] = x
  else:
    for i in arrays:
      leaves[i] = jnp.copy(leaves[i])
  return jax.device_put(jax.tree.unflatten(treedef, leaves), sharding)


def _leading_dim(batch: Any) -> int:
  leaves = jax.tree_util.tree_leaves_with_path(batch)
  if not leaves:
    raise ValueError("batch has no array leaves")
  sizes = {}
  for path, x in leaves:
    if np.ndim(x) == 0:
      raise ValueError(
        f"batch leaf {jax.tree_util.keystr(path)} is a scalar; every batch array needs a "
        "leading batch axis"
      )
    sizes[jax.tree_util.keystr(path)] = np.shape(x)[0]
  if len(set(sizes.values())) != 1:
    raise ValueError(f"batch arrays have different leading (batch) sizes: {sizes}")
  return next(iter(sizes.values()))


def _check_divisible(batch: Any, num_devices: int, mode: str) -> int:
  b = _leading_dim(batch)
  if b % num_devices:
    raise ValueError(
      f"batch size {b} is not divisible by the number of devices {num_devices} "
      f"(mode {mode!r}); use a batch size that is a multiple of {num_devices}"
    )
  return b


class ParallelStep:
  """A step body compiled for one execution mode, plus placement helpers.

  Create with :func:`make_parallel_step`. Attributes: ``mode`` (resolved: ``'jit'``,
  ``'shard_map'``, ``'pmap'`` or ``'fsdp'``), ``axis_name`` (the name given to the body, or
  ``None`` for ``'jit'``/``'fsdp'``), ``devices``, ``num_devices`` and ``mesh`` (``None`` for
  ``'jit'`` and ``'pmap'``).
  """

  def __init__(
    self,
    step_fn: Callable[..., Any],
    *,
    mode: str,
    axis_name: str,
    devices: Sequence[jax.Device],
    donate: bool,
    check_vma: bool,
    fsdp_min_size: int,
    jit_fn: Callable[..., Any] = jax.jit,
  ):
    self.mode = mode
    self.devices = tuple(devices)
    self.num_devices = len(self.devices)
    self._mesh_axis = axis_name
    self._fsdp_min_size = fsdp_min_size
    donate_argnums = (0,) if donate else ()
    self.mesh = None
    if mode == "jit":
      self.axis_name = None
      self._fn = jit_fn(functools.partial(step_fn, axis_name=None), donate_argnums=donate_argnums)
    elif mode == "shard_map":
      self.axis_name = axis_name
      self.mesh = make_data_mesh(axis_name=axis_name, devices=self.devices)
      body = jax.shard_map(
        functools.partial(step_fn, axis_name=axis_name),
        mesh=self.mesh,
        in_specs=(P(), P(axis_name)),
        out_specs=P(),
        check_vma=check_vma,
      )
      self._fn = jit_fn(body, donate_argnums=donate_argnums)
    elif mode == "pmap":
      self.axis_name = axis_name
      self._pmap_mesh = Mesh(np.asarray(self.devices), (axis_name,))
      self._fn = jax.pmap(
        functools.partial(step_fn, axis_name=axis_name),
        axis_name=axis_name,
        devices=self.devices,
        donate_argnums=donate_argnums,
      )
    elif mode == "fsdp":
      self.axis_name = None
      self.mesh = make_data_mesh(axis_name=axis_name, devices=self.devices)
      self._step_fn = functools.partial(step_fn, axis_name=None)
      self._donate_argnums = donate_argnums
      self._fn = None  # built on the first call, from the state's shardings
    else:
      raise ValueError(f"mode must be one of {MODES}, got {mode!r}")

  # ---- placement -----------------------------------------------------------------------

  def put_state(self, state: Any) -> Any:
    """Places a host (unreplicated) state for this mode; always copies.

    ``'jit'``: on the first device. ``'shard_map'``: replicated over the mesh. ``'pmap'``:
    stacked along a new leading device axis. ``'fsdp'``: large leaves sharded by
    :func:`fsdp_shardings`, the rest replicated.
    """
    if self.mode == "jit":
      return _place_copy(state, self.devices[0])
    if self.mode == "shard_map":
      return _place_copy(state, NamedSharding(self.mesh, P()))
    if self.mode == "pmap":
      sharding = NamedSharding(self._pmap_mesh, P(self._mesh_axis))
      stack = lambda x: jnp.broadcast_to(x, (self.num_devices,) + jnp.shape(x))
      return _place_copy(jax.tree.map(stack, state), sharding)
    return shard_params(state, self.mesh, axis_name=self._mesh_axis, min_size=self._fsdp_min_size)

  replicate = put_state

  def shard_batch(self, batch: Any) -> Any:
    """Places a host batch (leading axis = batch) the way the compiled step expects it.

    Raises:
      ValueError: if the batch size is not divisible by the number of devices, or the
        leaves have different leading sizes.
    """
    if self.mode == "jit":
      _leading_dim(batch)
      return jax.device_put(batch, self.devices[0])
    local = [d for d in self.devices if d.process_index == jax.process_index()]
    b = _check_divisible(batch, len(local), self.mode)
    if self.mode == "pmap":
      n = self.num_devices
      sharding = NamedSharding(self._pmap_mesh, P(self._mesh_axis))
      split = lambda x: jnp.reshape(x, (n, b // n) + tuple(np.shape(x)[1:]))
      return jax.device_put(jax.tree.map(split, batch), sharding)
    sharding = NamedSharding(self.mesh, P(self._mesh_axis))
    if jax.process_count() == 1:
      return jax.device_put(batch, sharding)
    return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch
    )

  def unreplicate(self, tree: Any) -> Any:
    """Returns ``tree`` without the device axis: ``x[0]`` per leaf in ``'pmap'`` mode.

    In the other modes arrays already have their logical (unreplicated) shape and are
    returned as they are (replicated or sharded ``jax.Array``; ``jax.device_get`` them for
    host numbers). ``put_state(unreplicate(state))`` round-trips in every mode.
    """
    if self.mode != "pmap":
      return tree
    return jax.tree.map(lambda x: x[0], tree)

  # ---- execution -----------------------------------------------------------------------

  def _build_fsdp(self, state: Any) -> Callable[..., Any]:
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    treedef = jax.tree.structure(state)
    step_fn = self._step_fn

    def body(state, batch):
      out = step_fn(state, batch)
      if isinstance(out, tuple) and out and jax.tree.structure(out[0]) == treedef:
        out = (jax.lax.with_sharding_constraint(out[0], state_shardings),) + out[1:]
      return out

    return jax.jit(body, donate_argnums=self._donate_argnums)

  def __call__(self, state: Any, batch: Any) -> Any:
    """Runs the step on ``state`` (from ``put_state`` or a previous call) and ``batch``.

    ``batch`` should come from ``shard_batch``; in ``'jit'``, ``'shard_map'`` and ``'fsdp'``
    mode a host batch also works (it is transferred by ``jit``), in ``'pmap'`` mode it must
    already have the leading device axis.
    """
    if self.mode in ("shard_map", "fsdp"):
      _check_divisible(batch, self.num_devices, self.mode)
    elif self.mode == "pmap":
      b = _leading_dim(batch)
      if b != self.num_devices:
        raise ValueError(
          f"pmap batch must have a leading device axis of size {self.num_devices}, got "
          f"{b}; pass the host batch through shard_batch"
        )
    if self.mode == "fsdp" and self._fn is None:
      self._fn = self._build_fsdp(state)
    return self._fn(state, batch)


def make_parallel_step(
  step_fn: Callable[..., Any],
  *,
  mode: str = "auto",
  axis_name: str = "data",
  devices: Sequence[jax.Device] | None = None,
  donate: bool = True,
  check_vma: bool = False,
  fsdp_min_size: int = 2**16,
  jit_fn: Callable[..., Any] = jax.jit,
) -> ParallelStep:
  """Compiles ``step_fn(state, batch, *, axis_name) -> outputs`` for one execution mode.

  Args:
    step_fn: pure step body; receives ``axis_name=None`` in ``'jit'``/``'fsdp'`` mode and
      ``axis_name=axis_name`` otherwise. All outputs must be device-invariant (averaged or
      gathered over ``axis_name``).
    mode: ``'auto'`` (``'shard_map'`` with several devices, else ``'jit'``), ``'jit'``,
      ``'shard_map'``, ``'pmap'`` or ``'fsdp'`` (see the module docstring).
    axis_name: name of the mapped / mesh axis.
    devices: devices to use (default ``jax.devices()``; ``'jit'`` uses the first).
    donate: donate the state argument's buffers (updated in place).
    check_vma: ``shard_map``'s replication checking (see the module docstring).
    fsdp_min_size: ``min_size`` of :func:`fsdp_shardings` in ``'fsdp'`` mode.
    jit_fn: compiles the body in ``'jit'`` and ``'shard_map'`` mode, called as
      ``jit_fn(body, donate_argnums=...)``: ``jax.jit``, or e.g. ``functools.partial(
      jaxrm.io.program_cache.jit, name=..., key=...)``, which keeps the lowered program on disk
      for later processes.

  Returns:
    A :class:`ParallelStep`.
  """
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  devices = list(jax.devices() if devices is None else devices)
  if not devices:
    raise ValueError("devices must not be empty")
  if mode == "auto":
    mode = "shard_map" if len(devices) > 1 else "jit"
  if mode == "jit":
    devices = devices[:1]
  return ParallelStep(
    step_fn,
    mode=mode,
    axis_name=axis_name,
    devices=devices,
    donate=donate,
    check_vma=check_vma,
    fsdp_min_size=fsdp_min_size,
    jit_fn=jit_fn,
  )
