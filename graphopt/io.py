"""Safe model loading and atomic saving.

Loading sniffs the file format before parsing, validates every tensor's declared size
and every external-data reference *before* any tensor is materialised, and leaves
external data memory-mapped read-only (onnx-ir's ``ExternalTensor``), so a multi-GB
model is never copied whole into memory.

Saving stages every file in the destination's folder and renames them into place, data
files first and the ``.onnx`` last; on any failure nothing is left at the destination.
Models whose serialized size would pass the protobuf limit are written with external data
transparently.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx_ir as ir
from onnx import TensorProto

from graphopt.errors import (
    InvalidModelError,
    OutputConflictError,
    SecurityError,
    UsageError,
)

logger = logging.getLogger(__name__)

#: Protobuf cannot serialize a message of 2 GiB or more.
PROTOBUF_LIMIT = 2**31 - 1
#: Tensors at least this large go to the external data file when one is written.
EXTERNAL_DATA_THRESHOLD = 1024
_STAGE_PREFIX = ".graphopt-stage-"


@dataclass(frozen=True)
class LoadedModel:
    """A model loaded from disk together with where it came from.

    Attributes:
        model: The in-memory IR. External tensors stay memory-mapped from ``path``'s folder.
        path: The resolved path of the ``.onnx`` file.
        external_files: Resolved paths of the external data files it references.
    """

    model: ir.Model
    path: Path
    external_files: tuple[Path, ...]
    fidelity: FidelityRecord | None = None

    @property
    def has_external_data(self) -> bool:
        """Whether any tensor lives in an external data file."""
        return bool(self.external_files)


@dataclass(frozen=True)
class FidelityRecord:
    """What serialization through onnx-ir does not keep by itself, read from the source.

    onnx-ir writes ``metadata_props`` sorted by key and adds a ``value_info`` entry for
    every initializer. :func:`restore_fidelity` undoes both against this record, so a
    no-op pipeline reproduces the source field for field.

    Attributes:
        metadata_order: The source's metadata keys in their order.
        value_info_names: Names that had a ``value_info`` entry in any graph of the source.
    """

    metadata_order: tuple[str, ...]
    value_info_names: frozenset[str]

    @classmethod
    def of(cls, proto: onnx.ModelProto) -> FidelityRecord:
        """Reads the record from a source model."""
        names: set[str] = set()
        for graph in _iter_graphs(proto.graph):
            names.update(v.name for v in graph.value_info)
        return cls(tuple(p.key for p in proto.metadata_props), frozenset(names))


def _iter_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _iter_graphs(attr.g)
            for g in attr.graphs:
                yield from _iter_graphs(g)


def restore_fidelity(proto: onnx.ModelProto, record: FidelityRecord) -> None:
    """Puts metadata back in the source's order and drops the ``value_info`` entries that
    onnx-ir added for initializers (the source had none for them). In place."""
    order = {key: i for i, key in enumerate(record.metadata_order)}
    props = [(p.key, p.value) for p in proto.metadata_props]
    props.sort(key=lambda kv: (order.get(kv[0], len(order)), 0 if kv[0] in order else 1))
    if [k for k, _ in props] != [p.key for p in proto.metadata_props]:
        del proto.metadata_props[:]
        for key, value in props:
            proto.metadata_props.add(key=key, value=value)
    for graph in _iter_graphs(proto.graph):
        initializers = {t.name for t in graph.initializer}
        keep = [
            v
            for v in graph.value_info
            if v.name not in initializers or v.name in record.value_info_names
        ]
        if len(keep) != len(graph.value_info):
            del graph.value_info[:]
            graph.value_info.extend(keep)


# --------------------------------------------------------------------------- sniffing

_MAGIC: list[tuple[bytes, str]] = [
    (b"PK\x03\x04", "a zip archive (a PyTorch .pt/.pth checkpoint or a .zip)"),
    (b"\x93NUMPY", "a NumPy .npy array"),
    (b"GGUF", "a GGUF model (llama.cpp)"),
    (b"\x89HDF", "an HDF5 file (Keras .h5)"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"\x7fELF", "an ELF binary"),
    (b"TFL3", "a TensorFlow Lite model"),
]


def sniff_format(head: bytes, file_size: int) -> str | None:
    """Names the format of a file that is clearly not an ONNX protobuf.

    Args:
        head: The first bytes of the file (at least 16 when the file is that long).
        file_size: The file's size in bytes.

    Returns:
        A description of the detected non-ONNX format, or None when the bytes may be ONNX.
    """
    if file_size == 0:
        return "an empty (0-byte) file"
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "a Python pickle (it is never unpickled)"
    if len(head) >= 9:
        header_len = int.from_bytes(head[:8], "little")
        if 0 < header_len < file_size and head[8:9] == b"{":
            return "a safetensors file"
    stripped = head.lstrip()
    if stripped[:1] in (b"{", b"[") or stripped.startswith(b"<"):
        return "a JSON/XML text file"
    if head and all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        # ONNX protobufs start with field tags such as 0x08 (ir_version); text never does.
        return "a text file"
    return None


# --------------------------------------------------------------------------- validation


def _iter_tensor_protos(model: onnx.ModelProto) -> Iterator[tuple[str, TensorProto]]:
    """Yields (where, tensor) for every TensorProto in the model, subgraphs included."""

    def from_graph(graph: onnx.GraphProto, where: str) -> Iterator[tuple[str, TensorProto]]:
        for t in graph.initializer:
            yield f"{where}initializer '{t.name}'", t
        for st in graph.sparse_initializer:
            yield f"{where}sparse initializer '{st.values.name}'", st.values
            yield f"{where}sparse initializer '{st.values.name}' indices", st.indices
        for node in graph.node:
            yield from from_nodes([node], where)

    def from_nodes(nodes: list[onnx.NodeProto], where: str) -> Iterator[tuple[str, TensorProto]]:
        for node in nodes:
            label = node.name or node.op_type
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield f"{where}node '{label}' attribute '{attr.name}'", attr.t
                for t in attr.tensors:
                    yield f"{where}node '{label}' attribute '{attr.name}'", t
                if attr.HasField("g"):
                    yield from from_graph(attr.g, f"{where}{label}/{attr.name}: ")
                for g in attr.graphs:
                    yield from from_graph(g, f"{where}{label}/{attr.name}: ")

    yield from from_graph(model.graph, "")
    for func in model.functions:
        yield from from_nodes(list(func.node), f"function '{func.name}': ")


def _element_count(tensor: TensorProto, where: str, source: Path) -> int:
    count = 1
    for d in tensor.dims:
        if d < 0:
            raise InvalidModelError(f"{source}: {where} has negative dimension {d}")
        count *= d
        if count > 2**62:
            raise InvalidModelError(
                f"{source}: {where} declares {list(tensor.dims)}: element count overflows"
            )
    return count


def _item_bits(data_type: int) -> int | None:
    try:
        return ir.DataType(data_type).bitwidth
    except Exception:  # noqa: BLE001 - unknown enum or no fixed width (STRING)
        return None


def _check_external(tensor: TensorProto, where: str, base: Path, source: Path) -> Path:
    info = {e.key: e.value for e in tensor.external_data}
    location = info.get("location", "")
    if not location:
        raise InvalidModelError(f"{source}: {where} has external data without a location")
    loc = Path(location)
    if loc.is_absolute() or ".." in loc.parts or location.startswith(("/", "\\")):
        raise SecurityError(
            f"{source}: {where} external data location {location!r} points outside the "
            "model's folder; only relative paths inside it are allowed"
        )
    candidate = base / loc
    # Refuse links anywhere between the model folder and the file.
    probe = base
    for part in loc.parts:
        probe = probe / part
        if probe.is_symlink():
            raise SecurityError(
                f"{source}: {where} external data {location!r} goes through the link "
                f"{probe}; links are not followed"
            )
    resolved = candidate.resolve()
    if base.resolve() not in resolved.parents:
        raise SecurityError(
            f"{source}: {where} external data {location!r} resolves outside the model folder"
        )
    if not resolved.is_file():
        raise InvalidModelError(f"{source}: {where} external data file {location!r} is missing")
    try:
        offset = int(info.get("offset", "0"))
        length = int(info["length"]) if "length" in info else None
    except ValueError as e:
        raise InvalidModelError(f"{source}: {where} has a non-integer offset/length") from e
    file_size = resolved.stat().st_size
    bits = _item_bits(tensor.data_type)
    expected = None
    if bits is not None:
        expected = (_element_count(tensor, where, source) * bits + 7) // 8
    if length is None:
        length = file_size - offset if expected is None else expected
    if offset < 0 or length < 0 or offset + length > file_size:
        raise InvalidModelError(
            f"{source}: {where} external data {location!r} is truncated: needs bytes "
            f"[{offset}, {offset + length}) but the file has {file_size}"
        )
    if expected is not None and length != expected:
        raise InvalidModelError(
            f"{source}: {where} external data length {length} does not match its shape "
            f"{list(tensor.dims)} ({expected} bytes)"
        )
    return resolved


def _check_tensor(
    tensor: TensorProto, where: str, base: Path, source: Path, external: set[Path]
) -> None:
    if tensor.data_location == TensorProto.EXTERNAL:
        external.add(_check_external(tensor, where, base, source))
        return
    count = _element_count(tensor, where, source)
    if tensor.HasField("raw_data"):
        bits = _item_bits(tensor.data_type)
        if bits is not None:
            expected = (count * bits + 7) // 8
            if len(tensor.raw_data) != expected:
                raise InvalidModelError(
                    f"{source}: {where} raw_data has {len(tensor.raw_data)} bytes but shape "
                    f"{list(tensor.dims)} of {ir.DataType(tensor.data_type).name} needs {expected}"
                )


def _check_versions(proto: onnx.ModelProto, source: Path) -> None:
    if proto.ir_version <= 0:
        raise InvalidModelError(f"{source}: model has no ir_version; not a valid ONNX model")
    if proto.ir_version > onnx.IR_VERSION:
        raise InvalidModelError(
            f"{source}: ir_version {proto.ir_version} is newer than supported ({onnx.IR_VERSION})"
        )
    if not proto.opset_import:
        raise InvalidModelError(f"{source}: model has no opset_import")
    max_opset = onnx.defs.onnx_opset_version()
    for op in proto.opset_import:
        if op.domain in ("", "ai.onnx") and op.version > max_opset:
            raise InvalidModelError(
                f"{source}: opset {op.version} of domain ai.onnx is newer than supported "
                f"({max_opset}); upgrade onnx or re-export at a lower opset"
            )


# --------------------------------------------------------------------------- loading


def _check_input_path(path: Path) -> None:
    if not path.exists():
        raise UsageError(f"{path}: no such file")
    if path.is_dir():
        raise UsageError(f"{path}: is a directory, expected an .onnx file")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{path}: file is not readable")


def read_proto(path: str | os.PathLike[str]) -> tuple[onnx.ModelProto, Path, tuple[Path, ...]]:
    """Reads and validates an ONNX protobuf without loading external data.

    Args:
        path: The ``.onnx`` file.

    Returns:
        The protobuf (external tensors still referenced, not loaded), the resolved path and
        the resolved external data files.

    Raises:
        UsageError: The path is missing, a directory or unreadable.
        InvalidModelError: The file is not a valid, supported ONNX model.
        SecurityError: External data points outside the model's folder or through a link.
    """
    source = Path(path)
    _check_input_path(source)
    resolved = source.resolve()
    size = resolved.stat().st_size
    try:
        with open(resolved, "rb") as f:
            head = f.read(64)
    except OSError as e:  # permission checks other than mode bits (ACLs, LSMs), races
        raise UsageError(f"{source}: cannot be read ({e.strerror or type(e).__name__})") from None
    found = sniff_format(head, size)
    if found is not None:
        raise InvalidModelError(f"{source}: not an ONNX model: found {found}")
    if size > PROTOBUF_LIMIT:
        raise InvalidModelError(
            f"{source}: {size} bytes is over protobuf's 2 GiB limit; store the weights as "
            "external data (onnx.save(..., save_as_external_data=True))"
        )
    proto = onnx.ModelProto()
    try:
        with open(resolved, "rb") as f:
            consumed = proto.ParseFromString(f.read())
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad input
        raise InvalidModelError(
            f"{source}: not an ONNX model: protobuf parse failed ({type(e).__name__})"
        ) from None
    if consumed != size or not proto.HasField("graph"):
        raise InvalidModelError(f"{source}: not an ONNX model: no graph found ({size} bytes)")
    _check_versions(proto, source)
    external: set[Path] = set()
    base = resolved.parent
    for where, tensor in _iter_tensor_protos(proto):
        _check_tensor(tensor, where, base, source, external)
    try:
        if external:
            # Given a protobuf, the checker looks for external data files relative to the
            # current directory; given the path, it looks beside the model (where the checks
            # above already found them).
            onnx.checker.check_model(str(resolved))
        else:
            onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else "invalid"
        raise InvalidModelError(f"{source}: ONNX checker: {reason}") from None
    return proto, resolved, tuple(sorted(external))


def load(path: str | os.PathLike[str]) -> LoadedModel:
    """Loads an ONNX model safely; external data stays memory-mapped read-only.

    Args:
        path: The ``.onnx`` file.

    Returns:
        The loaded model and its provenance.

    Raises:
        UsageError: The path is missing, a directory or unreadable.
        InvalidModelError: The file is not a valid, supported ONNX model.
        SecurityError: External data points outside the model's folder or through a link.
    """
    proto, resolved, external = read_proto(path)
    try:
        model = ir.serde.deserialize_model(proto)
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - any conversion failure is a bad input
        raise InvalidModelError(f"{path}: cannot be converted to IR: {e}") from None
    ir.external_data.set_base_dir(model.graph, resolved.parent)
    logger.debug("loaded %s (%d external data files)", resolved, len(external))
    return LoadedModel(
        model=model,
        path=resolved,
        external_files=external,
        fidelity=FidelityRecord.of(proto),
    )


# --------------------------------------------------------------------------- saving


def _serialized_size_estimate(model: ir.Model) -> int:
    total = 0
    for graph in (model.graph, *model.graph.subgraphs()):
        for value in graph.initializers.values():
            if value.const_value is not None:
                total += value.const_value.nbytes
    return total


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_destination(
    output: Path, inputs: tuple[Path, ...], *, overwrite: bool, in_place: bool
) -> None:
    """Refuses destinations that exist (without overwrite) or that are an input file.

    Raises:
        OutputConflictError: As above (exit 7).
        UsageError: The destination's folder does not exist.
    """
    if not output.parent.exists():
        raise UsageError(f"{output}: folder {output.parent} does not exist")
    if output.is_dir():
        raise UsageError(f"{output}: is a directory, expected a file path")

    def is_input(path: Path, src: Path) -> bool:
        return _same_file(path, src) or path.resolve() == src

    for i, src in enumerate(inputs):
        if is_input(output, src):
            if not in_place or i != 0:
                raise OutputConflictError(
                    f"{output}: output is the input model or one of its data files; "
                    "pass --in-place to replace the model"
                )
            return
    # The external data file the output may get (``<name>.data``) is a destination too.
    data_file = output.with_name(output.name + ".data")
    for src in inputs:
        if is_input(data_file, src):
            raise OutputConflictError(
                f"{output}: its external data file {data_file.name} would replace the "
                f"input's data file {src}; choose another output name"
            )
    if output.exists() and not overwrite:
        raise OutputConflictError(f"{output}: already exists; pass --overwrite to replace it")
    if data_file.exists() and not overwrite:
        raise OutputConflictError(
            f"{output}: {data_file.name} already exists beside it; pass --overwrite to replace it"
        )


@contextlib.contextmanager
def _staging_dir(folder: Path) -> Iterator[Path]:
    stage = Path(tempfile.mkdtemp(prefix=_STAGE_PREFIX, dir=folder))
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


class StagedModel:
    """A model written into a staging folder beside its destination, not yet published.

    Use :func:`stage_model` as a context manager; call :meth:`commit` to rename the files
    into place (data files first, the ``.onnx`` last). Leaving the context without a commit
    deletes everything staged, so a failed run leaves nothing at the destination.

    Attributes:
        destination: The final ``.onnx`` path.
        model_path: The staged ``.onnx`` (loadable, e.g. for verification).
        files: The staged files, data files first.
    """

    def __init__(self, destination: Path, model_path: Path, files: list[Path]) -> None:
        self.destination = destination
        self.model_path = model_path
        self.files = files
        self.committed: list[Path] = []

    def commit(self) -> list[Path]:
        """Renames the staged files into the destination folder; returns the final paths."""
        folder = self.destination.parent
        for staged in self.files:
            final = folder / staged.name
            os.replace(staged, final)
            self.committed.append(final)
        return list(self.committed)


def _decide_external(
    model: ir.Model, dest: Path, external_data: bool | None, size_limit: int
) -> bool:
    estimate = _serialized_size_estimate(model)
    if external_data is None:
        if estimate >= size_limit:
            logger.info(
                "%s: weights (%d bytes) exceed the %d-byte single-file limit; writing "
                "external data",
                dest,
                estimate,
                size_limit,
            )
            return True
        return False
    if not external_data and estimate >= size_limit:
        raise InvalidModelError(
            f"{dest}: weights ({estimate} bytes) exceed the single-file limit "
            f"({size_limit}); save with external data"
        )
    return external_data


@contextlib.contextmanager
def stage_model(
    model: ir.Model,
    path: str | os.PathLike[str],
    *,
    external_data: bool | None = None,
    size_limit: int = PROTOBUF_LIMIT,
    fidelity: FidelityRecord | None = None,
) -> Iterator[StagedModel]:
    """Writes ``model`` into a staging folder in the destination's filesystem.

    Args:
        model: The model to write. It is not changed.
        path: Destination ``.onnx`` path. Its external data file, when one is written, is
            ``<name>.onnx.data`` beside it.
        external_data: True to always write external data, False never, None to decide by
            size (over ``size_limit`` goes external, transparently).
        size_limit: The serialized size at which external data becomes necessary.
        fidelity: The source's record; restores what onnx-ir's serialization changes.

    Yields:
        The staged model; nothing is published unless ``commit()`` is called.

    Raises:
        InvalidModelError: ``external_data=False`` but the model is over ``size_limit``.
    """
    dest = Path(path)
    folder = dest.parent.resolve()
    use_external = _decide_external(model, dest, external_data, size_limit)
    data_name = dest.name + ".data"
    with _staging_dir(folder) as stage:
        staged_model = stage / dest.name
        if use_external:
            ir.save(
                model,
                staged_model,
                external_data=data_name,
                size_threshold_bytes=EXTERNAL_DATA_THRESHOLD,
            )
            if fidelity is not None:
                # The .onnx holds no weights here; patch it in place in the stage.
                proto = onnx.load(str(staged_model), load_external_data=False)
                restore_fidelity(proto, fidelity)
                staged_model.write_bytes(proto.SerializeToString())
        else:
            proto = ir.serde.serialize_model(model)
            if fidelity is not None:
                restore_fidelity(proto, fidelity)
            staged_model.write_bytes(proto.SerializeToString())
        files = [p for p in (stage / data_name,) if p.exists()] + [staged_model]
        yield StagedModel(folder / dest.name, staged_model, files)


def save(
    model: ir.Model,
    path: str | os.PathLike[str],
    *,
    external_data: bool | None = None,
    size_limit: int = PROTOBUF_LIMIT,
    fidelity: FidelityRecord | None = None,
) -> list[Path]:
    """Writes a model atomically (staged in the destination folder, then renamed).

    See :func:`stage_model` for the arguments.

    Returns:
        The files written, data file first.
    """
    with stage_model(
        model, path, external_data=external_data, size_limit=size_limit, fidelity=fidelity
    ) as staged:
        return staged.commit()


def file_digest(path: Path) -> str:
    """Returns the SHA-256 of a file, read in chunks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_files_size(loaded_or_paths: LoadedModel | list[Path]) -> int:
    """Total bytes on disk of a model file and its external data files."""
    if isinstance(loaded_or_paths, LoadedModel):
        files = [loaded_or_paths.path, *loaded_or_paths.external_files]
    else:
        files = loaded_or_paths
    return sum(p.stat().st_size for p in files if p.exists())


def is_regular_file(path: Path) -> bool:
    """Whether ``path`` is a regular file (not a link, device or folder)."""
    try:
        return stat.S_ISREG(path.lstat().st_mode)
    except OSError:
        return False
