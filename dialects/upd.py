"""The `upd` dialect: sparse deltas and the update ops applied to tables.

A delta `!upd.delta<DIMxf32, i64>` is a sparse gradient: ids with one row
each, duplicates allowed and meaning "summed". `upd.dedup` changes only the
representation (`!upd.delta<DIMxf32, i64, unique>`); lowering needs unique
ids before anything non-linear (every optimizer but sgd, norm clipping,
weight decay) and `upd-dedup` puts them there.

Tables have value semantics: an optimizer returns the new table and state.
The chain clip -> weight_decay -> optimizer -> stochastic_round ->
requantize -> stamp is what `upd-fuse` turns into one `upd.apply`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from xdsl.dialects.builtin import (
    DictionaryAttr,
    FloatAttr,
    IntAttr,
    IntegerAttr,
    IntegerType,
    StringAttr,
    TensorType,
    UnitAttr,
)
from xdsl.ir import Attribute, Dialect, Operation, ParametrizedAttribute, TypeAttribute
from xdsl.irdl import (
    AttrSizedOperandSegments,
    AttrSizedResultSegments,
    IRDLOperation,
    irdl_attr_definition,
    irdl_op_definition,
    operand_def,
    opt_operand_def,
    opt_result_def,
    param_def,
    result_def,
    traits_def,
    var_operand_def,
    var_result_def,
)
from xdsl.parser import AttrParser
from xdsl.printer import Printer
from xdsl.pattern_rewriter import PatternRewriter, RewritePattern
from xdsl.traits import HasCanonicalizationPatternsTrait, Pure
from xdsl.utils.exceptions import VerifyException

from . import catalog
from .common import InferredResultsOp, SettingsOp, get_float, setting, settings, verify_inferred
from .common import flag as is_set
from .limits import MAX_DIM, MAX_PARTITIONS, MAX_PREFETCH
from .emb import StateType, TableType, VersionsType, check_ids, check_rows, expect_table

i64 = IntegerType(64)


@irdl_attr_definition
class DeltaType(ParametrizedAttribute, TypeAttribute):
    """A batch of (id, f32 row) pairs of dynamic size; `unique` after dedup."""

    name = "upd.delta"
    dim: IntAttr = param_def(IntAttr)
    index: StringAttr = param_def(StringAttr)
    unique: IntAttr = param_def(IntAttr)

    def __init__(self, dim: int, index: str = "i64", unique: bool = False):
        super().__init__(IntAttr(dim), StringAttr(index), IntAttr(int(unique)))

    @property
    def is_unique(self) -> bool:
        return bool(self.unique.data)

    def with_unique(self, unique: bool = True) -> DeltaType:
        return DeltaType(self.dim.data, self.index.data, unique)

    def verify(self) -> None:
        if self.dim.data < 1:
            raise VerifyException("!upd.delta needs rows of at least one value")
        if self.index.data not in ("i32", "i64"):
            raise VerifyException("!upd.delta ids must be i32 or i64")

    def print_parameters(self, printer: Printer) -> None:
        tail = ", unique" if self.is_unique else ""
        printer.print_string(f"<{self.dim.data}xf32, {self.index.data}{tail}>")

    @classmethod
    def parse_parameters(cls, parser: AttrParser) -> Sequence[Attribute]:
        with parser.in_angle_brackets():
            pos = parser.pos
            dims = parser.parse_dimension_list()
            if len(dims) != 1 or dims[0] < 1:
                parser.raise_error("expected the delta's row size, e.g. 64xf32", pos, parser.pos)
            parser.parse_shape_delimiter()
            parser.parse_keyword("f32", " (delta rows are f32)")
            parser.parse_punctuation(",")
            pos = parser.pos
            index = parser.parse_identifier()
            if index not in ("i32", "i64"):
                parser.raise_error("delta ids must be i32 or i64", pos, parser.pos)
            unique = parser.parse_optional_punctuation(",") is not None
            if unique:
                parser.parse_keyword("unique")
        return (IntAttr(dims[0]), StringAttr(index), IntAttr(int(unique)))


def expect_delta(t: Attribute, what: str) -> DeltaType:
    if not isinstance(t, DeltaType):
        raise VerifyException(f"{what} must be an !upd.delta, got {t}")
    return t


def check_delta_fits(delta: DeltaType, table: TableType, op: str) -> None:
    if delta.dim.data != table.dim.data:
        raise VerifyException(
            f"'{op}': delta rows have {delta.dim.data} values but the table's dim is "
            f"{table.dim.data}"
        )


def expect_master(t: Attribute, op: str) -> TableType:
    table = expect_table(t, f"'{op}' table operand")
    if table.quantized:
        raise VerifyException(
            f"'{op}' cannot update a quantized table ({table.layout.data}): "
            "optimizers update f32/f16/bf16 master tables and re-quantize serving copies"
        )
    return table


def expect_state(t: Attribute, table: TableType, width: int, op: str, what: str) -> StateType:
    if not isinstance(t, StateType):
        raise VerifyException(f"'{op}' needs its {what} state table, got {t}")
    if t.rows.data != table.rows.data or t.width.data != width:
        raise VerifyException(
            f"'{op}' {what} state must be !emb.state<{table.rows.data}x{width}>, got {t}"
        )
    return t


def expect_i64(t: Attribute, op: str, what: str) -> None:
    if t != i64:
        raise VerifyException(f"'{op}' {what} must be an i64 scalar, got {t}")


def check_positive(op: InferredResultsOp, name: str, required: bool = True) -> None:
    value = get_float(op, name)
    if value is None:
        if required:
            raise VerifyException(f"'{op.name}' needs the hyper-parameter '{name}'")
        return
    if not value > 0:
        raise VerifyException(f"'{op.name}' {name} must be positive, got {value}")


class UpdOp(SettingsOp):
    """Common verification of the unfused update ops.

    Each declares its operands and results with their type constraints; what
    a constraint cannot say (a delta's dim matches the table's, the state's
    shape) `infer_result_types` checks, naming the operand. Settings
    (hyper-parameters) are properties each op declares.
    """

    def verify_(self) -> None:
        verify_inferred(self)
        self.verify_attributes()

    def verify_attributes(self) -> None:
        pass


@irdl_op_definition
class DeltaOp(UpdOp):
    """Makes a delta from an ids tensor and a rows tensor of equal length."""

    name = "upd.delta"
    ids = operand_def(TensorType)
    rows = operand_def(TensorType)
    delta = result_def(DeltaType)
    traits = traits_def(Pure())

    @classmethod
    def infer_result_types(cls, operand_types, attributes):
        if len(operand_types) != 2:
            raise VerifyException("'upd.delta' takes ids and rows")
        index = check_ids(operand_types[0], "the delta's ids")
        rows = operand_types[1]
        if not isinstance(rows, TensorType) or len(rows.get_shape()) != 2:
            raise VerifyException("the delta's rows must be a 2-d tensor of f32")
        dim = rows.get_shape()[1]
        if dim < 1:
            raise VerifyException("the delta's rows need a static, positive width")
        check_rows(rows, dim, "the delta's rows")
        return [DeltaType(dim, index)]


class RedundantDedup(RewritePattern):
    """dedup of a delta that is already unique is the delta itself."""

    def match_and_rewrite(self, op: Operation, rewriter: PatternRewriter) -> None:
        if not isinstance(op, DedupOp):
            return
        source = op.operands[0]
        if isinstance(source.type, DeltaType) and source.type.is_unique:
            rewriter.replace(op, [], [source])


class DedupHasCanonicalizationPatterns(HasCanonicalizationPatternsTrait):
    @classmethod
    def get_canonicalization_patterns(cls) -> tuple[RewritePattern, ...]:
        return (RedundantDedup(),)


@irdl_op_definition
class DedupOp(UpdOp):
    """Sums the rows of equal ids: the result holds each id once."""

    name = "upd.dedup"
    input = operand_def(DeltaType)
    output = result_def(DeltaType)
    traits = traits_def(Pure(), DedupHasCanonicalizationPatterns())

    @classmethod
    def infer_result_types(cls, operand_types, attributes):
        if len(operand_types) != 1:
            raise VerifyException("'upd.dedup' takes one delta")
        return [expect_delta(operand_types[0], "'upd.dedup' operand").with_unique()]


@irdl_op_definition
class ClipOp(UpdOp):
    """Clips each row: by value (clamp) and/or by its L2 norm (max_norm)."""

    name = "upd.clip"
    input = operand_def(DeltaType)
    output = result_def(DeltaType)
    traits = traits_def(Pure())
    max_norm = setting(FloatAttr, "max_norm")
    clip_value = setting(FloatAttr, "clip_value")

    @classmethod
    def infer_result_types(cls, operand_types, attributes):
        if len(operand_types) != 1:
            raise VerifyException("'upd.clip' takes one delta")
        return [expect_delta(operand_types[0], "'upd.clip' operand")]

    def verify_attributes(self) -> None:
        if get_float(self, "max_norm") is None and get_float(self, "clip_value") is None:
            raise VerifyException("'upd.clip' needs max_norm or clip_value")
        check_hyper(self, {n: catalog.GRAD_HYPER[n] for n in ("max_norm", "clip_value")},
                    ("max_norm", "clip_value"))


@irdl_op_definition
class WeightDecayOp(UpdOp):
    """Adds decay * w to each row's gradient (L2 regularization, as torch)."""

    name = "upd.weight_decay"
    input = operand_def(DeltaType)
    table = operand_def(TableType)
    output = result_def(DeltaType)
    traits = traits_def(Pure())
    decay = setting(FloatAttr, "decay")  # required; optional here so the verifier's error says so

    @classmethod
    def infer_result_types(cls, operand_types, attributes):
        if len(operand_types) != 2:
            raise VerifyException("'upd.weight_decay' takes a delta and the table")
        delta = expect_delta(operand_types[0], "'upd.weight_decay' first operand")
        table = expect_master(operand_types[1], "upd.weight_decay")
        check_delta_fits(delta, table, "upd.weight_decay")
        return [delta]

    def verify_attributes(self) -> None:
        check_positive(self, "decay")
        check_hyper(self, {"decay": catalog.Hyper("decay", 0.0, 0.0, low_open=True)}, ("decay",))


class OptimizerOp(UpdOp):
    """An optimizer step: (table, *state, delta[, step]) -> (table, *state).

    What it needs (state, hyper-parameters and their ranges, the step) comes
    from its catalog entry: the named ops (`upd.sgd`, `upd.adam`, ...) stand
    for the built-ins, `upd.optimize {optimizer = "name"}` for any optimizer
    in the catalog, including ones a user defined with `@ekko.optimizer`.
    """

    OPTIMIZER: ClassVar[str] = ""  # "" for upd.optimize: named by its attribute

    table = operand_def(TableType)
    state = var_operand_def(StateType)
    delta = operand_def(DeltaType)
    step = opt_operand_def(i64)
    new_table = result_def(TableType)
    new_state = var_result_def(StateType)
    irdl_options = (AttrSizedOperandSegments(as_property=True),)

    @classmethod
    def roles(cls, flat: dict[str, Attribute]) -> list[str]:
        """table, one `state` per state array, delta[, step]: as the catalog says."""
        opt = cls.entry(flat)
        return ["table", *["state"] * len(opt.states), "delta", *["step"] * opt.uses_step]

    @classmethod
    def entry(cls, attributes: dict[str, Attribute]) -> catalog.Optimizer:
        name = cls.OPTIMIZER
        if not name:
            attr = attributes.get("optimizer")
            if not isinstance(attr, StringAttr):
                raise VerifyException(f"'{cls.name}' needs optimizer = \"name\"")
            name = attr.data
        try:
            return catalog.optimizer(name)
        except ValueError as e:
            raise VerifyException(f"'{cls.name}': {e}") from None

    @property
    def spec(self) -> catalog.Optimizer:
        return self.entry(self.flat())

    @classmethod
    def infer_result_types(cls, operand_types, attributes):
        opt = cls.entry(attributes)
        n = 2 + len(opt.states) + int(opt.uses_step)
        if len(operand_types) != n:
            parts = ["table", *[f"{s} state" for s in opt.state_names], "delta"]
            if opt.uses_step:
                parts.append("step")
            raise VerifyException(f"'{cls.name}' takes {n} operands: {', '.join(parts)}")
        table = expect_master(operand_types[0], cls.name)
        states = [
            expect_state(t, table, 1 if st.rowwise else table.dim.data, cls.name, st.name)
            for t, st in zip(operand_types[1 : 1 + len(opt.states)], opt.states)
        ]
        delta = expect_delta(operand_types[1 + len(opt.states)], f"'{cls.name}' delta")
        check_delta_fits(delta, table, cls.name)
        if opt.uses_step:
            expect_i64(operand_types[-1], cls.name, "step")
        return [table, *states]

    def verify_attributes(self) -> None:
        opt = self.spec
        if get_float(self, "lr") is None:
            raise VerifyException(f"'{self.name}' needs the hyper-parameter 'lr'")
        check_hyper(self, {h.name: h for h in opt.hyper}, opt.hyper_names,
                    skip=() if self.OPTIMIZER else ("optimizer",))


def check_hyper(op: IRDLOperation, known: dict[str, catalog.Hyper], takes: Sequence[str],
                skip: Sequence[str] = ()) -> None:
    """Every setting of `op` is a known hyper-parameter with a value in range."""
    for name, attr in settings(op).items():
        if name in skip:
            continue
        if name not in known:
            raise VerifyException(
                f"'{op.name}' has no hyper-parameter '{name}' (it takes {', '.join(takes)})")
        value = attr.value.data if isinstance(attr, FloatAttr) else attr
        if (why := known[name].problem(value)) is not None:
            raise VerifyException(f"'{op.name}' {why}")


@irdl_op_definition
class SgdOp(OptimizerOp):
    """w -= lr * g."""

    name = "upd.sgd"
    OPTIMIZER: ClassVar[str] = "sgd"
    lr = setting(FloatAttr, "lr")


@irdl_op_definition
class AdagradOp(OptimizerOp):
    """torch.optim.Adagrad on the touched rows."""

    name = "upd.adagrad"
    OPTIMIZER: ClassVar[str] = "adagrad"
    lr = setting(FloatAttr, "lr")
    eps = setting(FloatAttr, "eps")
    lr_decay = setting(FloatAttr, "lr_decay")


@irdl_op_definition
class RowwiseAdagradOp(OptimizerOp):
    """FBGEMM's rowwise Adagrad: one accumulated mean square per row."""

    name = "upd.rowwise_adagrad"
    OPTIMIZER: ClassVar[str] = "rowwise_adagrad"
    lr = setting(FloatAttr, "lr")
    eps = setting(FloatAttr, "eps")


@irdl_op_definition
class AdamOp(OptimizerOp):
    """torch.optim.SparseAdam: bias-corrected moments of the touched rows."""

    name = "upd.adam"
    OPTIMIZER: ClassVar[str] = "adam"
    lr = setting(FloatAttr, "lr")
    beta1 = setting(FloatAttr, "beta1")
    beta2 = setting(FloatAttr, "beta2")
    eps = setting(FloatAttr, "eps")


@irdl_op_definition
class RmspropOp(OptimizerOp):
    """torch.optim.RMSprop on the touched rows."""

    name = "upd.rmsprop"
    OPTIMIZER: ClassVar[str] = "rmsprop"
    lr = setting(FloatAttr, "lr")
    alpha = setting(FloatAttr, "alpha")
    eps = setting(FloatAttr, "eps")


@irdl_op_definition
class FtrlOp(OptimizerOp):
    """FTRL-Proximal (McMahan et al. 2013), per coordinate."""

    name = "upd.ftrl"
    OPTIMIZER: ClassVar[str] = "ftrl"
    lr = setting(FloatAttr, "lr")
    l1 = setting(FloatAttr, "l1")
    l2 = setting(FloatAttr, "l2")
    beta = setting(FloatAttr, "beta")


@irdl_op_definition
class OptimizeOp(OptimizerOp):
    """A step of any optimizer in the catalog, named by its `optimizer` property;
    its hyper-parameters are the `hyper` dictionary."""

    name = "upd.optimize"
    optimizer = setting(StringAttr, "optimizer")
    hyper = setting(DictionaryAttr, "hyper", True)


# the optimizers with a named op (each declares its catalog entry's hyper-parameters;
# tests/test_ir_python.py keeps the two equal); any other is written upd.optimize
NAMED_OPTIMIZER_OPS: dict[str, type[OptimizerOp]] = {
    op.OPTIMIZER: op for op in (SgdOp, AdagradOp, RowwiseAdagradOp, AdamOp, RmspropOp, FtrlOp)
}


def optimizer_op(name: str) -> tuple[type[OptimizerOp], dict[str, Attribute]]:
    """The op class for optimizer `name` and the attributes that name it."""
    catalog.optimizer(name)  # raises for unknown names
    if name in NAMED_OPTIMIZER_OPS:
        return NAMED_OPTIMIZER_OPS[name], {}
    return OptimizeOp, {"optimizer": StringAttr(name)}


@irdl_op_definition
class StochasticRoundOp(UpdOp):
    """Rounds the rows an optimizer just wrote stochastically, not to nearest.

    Only meaningful on f16/bf16 tables, and only right after the optimizer
    whose exact f32 results it rounds: the operand must be that op's table.
    """

    name = "upd.stochastic_round"
    table = operand_def(TableType)
    seed = operand_def(i64)
    result = result_def(TableType)

    @classmethod
    def infer_result_types(cls, operand_types, attributes):
        if len(operand_types) != 2:
            raise VerifyException("'upd.stochastic_round' takes the updated table and a seed")
        table = expect_table(operand_types[0], "'upd.stochastic_round' operand")
        if table.layout.data not in ("f16", "bf16"):
            raise VerifyException(
                f"stochastic rounding needs an f16 or bf16 table, got {table.layout.data}"
            )
        expect_i64(operand_types[1], cls.name, "seed")
        return [table]

    def verify_attributes(self) -> None:
        owner = self.operands[0].owner
        if not isinstance(owner, OptimizerOp) or self.operands[0] is not owner.results[0]:
            raise VerifyException(
                "'upd.stochastic_round' must round the table result of an optimizer op"
            )


@irdl_op_definition
class RequantizeOp(UpdOp):
    """Re-makes the serving rows of the delta's ids from the master table."""

    name = "upd.requantize"
    master = operand_def(TableType)
    serving = operand_def(TableType)
    delta = operand_def(DeltaType)
    result = result_def(TableType)
    traits = traits_def(Pure())

    @classmethod
    def infer_result_types(cls, operand_types, attributes):
        if len(operand_types) != 3:
            raise VerifyException("'upd.requantize' takes the master, the serving copy, a delta")
        master = expect_master(operand_types[0], cls.name)
        serving = expect_table(operand_types[1], "'upd.requantize' serving copy")
        if (serving.rows, serving.dim) != (master.rows, master.dim):
            raise VerifyException(
                "'upd.requantize' serving copy must have the master's rows and dim"
            )
        check_delta_fits(expect_delta(operand_types[2], "'upd.requantize' delta"), master, cls.name)
        return [serving]


@irdl_op_definition
class StampOp(UpdOp):
    """versions[id] = version for every id of the delta."""

    name = "upd.stamp"
    versions = operand_def(VersionsType)
    delta = operand_def(DeltaType)
    version = operand_def(i64)
    result = result_def(VersionsType)
    traits = traits_def(Pure())

    @classmethod
    def infer_result_types(cls, operand_types, attributes):
        if len(operand_types) != 3:
            raise VerifyException("'upd.stamp' takes versions, a delta and the version")
        versions = operand_types[0]
        if not isinstance(versions, VersionsType):
            raise VerifyException(f"'upd.stamp' needs !emb.versions, got {versions}")
        expect_delta(operand_types[1], "'upd.stamp' delta")
        expect_i64(operand_types[2], cls.name, "version")
        return [versions]


APPLY_FLAGS = ("serving", "versions", "step", "seed")
APPLY_UNITS = ("dedup", "stochastic_rounding")
APPLY_INTS = ("partitions", "tile", "prefetch", "block_rows", "num_warps")
APPLY_SCHEDULE = ("order", *APPLY_INTS)  # what upd-schedule sets ("order": a string)
# the custom form's unit flags, and the optional operands each makes present
APPLY_FLAG_OPERANDS = {"serving": ("serving",), "versions": ("versions", "version"),
                       "step": ("step",), "seed": ("seed",)}
# the settings after the optimizer's hyper-parameters, in the order they print
APPLY_ORDER = ("weight_decay", "max_norm", "clip_value", "dedup", "stochastic_rounding",
               "serving", "versions", "step", "seed", "order", *APPLY_INTS[:3], "serving_layout",
               *APPLY_INTS[3:])


def apply_roles(attributes: dict[str, Attribute], data: tuple[str, ...],
                unknown: str) -> list[str]:
    """Operand roles of a fused update (upd.apply, and kern.update below it).

    table, *optimizer state, `data` (the delta, or its ids and grads),
    [serving], [versions, version], [step], [seed]: in the flat settings the
    unit flags of the same names say which optional ones are present (the op
    stores that as its operand segment sizes). `unknown` is the error for a
    missing or unknown optimizer.
    """
    opt = attributes.get("optimizer")
    if not isinstance(opt, StringAttr) or opt.data not in catalog.OPTIMIZERS:
        raise VerifyException(unknown)
    roles = ["table", *catalog.optimizer(opt.data).state_names, *data]
    for name, operands in APPLY_FLAG_OPERANDS.items():
        if is_set(attributes, name, operands):
            roles += operands
    return roles


class FusedUpdateOp(SettingsOp):
    """Settings shared by upd.apply and kern.update: the optimizer, its
    hyper-parameters (the `hyper` dictionary), the gradient transforms and
    the schedule, all properties."""

    optimizer = setting(StringAttr, "optimizer", True)
    hyper = setting(DictionaryAttr, "hyper", True)
    weight_decay = setting(FloatAttr, "weight_decay")
    max_norm = setting(FloatAttr, "max_norm")
    clip_value = setting(FloatAttr, "clip_value")
    dedup = setting(UnitAttr, "dedup")
    stochastic_rounding = setting(UnitAttr, "stochastic_rounding")
    order = setting(StringAttr, "order")
    partitions = setting(IntegerAttr, "partitions")
    tile = setting(IntegerAttr, "tile")
    prefetch = setting(IntegerAttr, "prefetch")  # CPU targets: positions ahead rows are asked for
    block_rows = setting(IntegerAttr, "block_rows")
    num_warps = setting(IntegerAttr, "num_warps")

    FLAGS: ClassVar[dict[str, tuple[str, ...]]] = APPLY_FLAG_OPERANDS
    ORDER: ClassVar[tuple[str, ...]] = APPLY_ORDER

    @property
    def entry(self) -> catalog.Optimizer:
        return catalog.optimizer(self.optimizer.data)

    def hyper_values(self) -> dict[str, float]:
        """The optimizer's hyper-parameters and gradient transforms the op sets."""
        out = {n: float(a.value.data) for n, a in self.hyper.data.items()
               if isinstance(a, FloatAttr)}
        for name in catalog.GRAD_HYPER:
            attr = self.properties.get(name)
            if isinstance(attr, FloatAttr):
                out[name] = float(attr.value.data)
        return out

    def check_schedule(self) -> None:
        """What upd-schedule (or a hand-written op) chose is in range."""
        for name, most in (("partitions", MAX_PARTITIONS), ("tile", MAX_DIM),
                           ("prefetch", MAX_PREFETCH), ("block_rows", MAX_DIM),
                           ("num_warps", 32)):
            attr = self.properties.get(name)
            if isinstance(attr, IntegerAttr) and not 1 <= attr.value.data <= most:
                raise VerifyException(
                    f"'{self.name}' {name} must be 1 to {most}, got {attr.value.data}")
        order = self.properties.get("order")
        if order is not None and (not isinstance(order, StringAttr)
                                  or order.data not in catalog.APPLY_ORDERS):
            raise VerifyException(f"'{self.name}' order must be one of "
                                  f"{', '.join(map(repr, catalog.APPLY_ORDERS))}, got {order}")

    def role(self, name: str):
        """The operand playing `name`, or None when absent."""
        roles = self.roles(self.flat())
        return self.operands[roles.index(name)] if name in roles else None


@irdl_op_definition
class ApplyOp(FusedUpdateOp):
    """A fused update: one kernel that touches each row of the delta once.

    Operands: table, *state, delta, [serving], [versions, version], [step],
    [seed] (declared optional operands; the custom form marks the present
    ones with the unit flags `serving`, `versions`, `step`, `seed`).
    Results: table, *state, [serving], [versions]. Properties: `optimizer`
    names the step, `hyper` holds its hyper-parameters, floats the clipping
    and weight decay; `dedup` sums duplicates inside the kernel;
    upd-schedule adds `order`, `partitions` and `tile`.
    """

    name = "upd.apply"
    table = operand_def(TableType)
    state = var_operand_def(StateType)
    delta = operand_def(DeltaType)
    serving = opt_operand_def(TableType)
    versions = opt_operand_def(VersionsType)
    version = opt_operand_def(i64)
    step = opt_operand_def(i64)
    seed = opt_operand_def(i64)
    new_table = result_def(TableType)
    new_state = var_result_def(StateType)
    new_serving = opt_result_def(TableType)
    new_versions = opt_result_def(VersionsType)
    irdl_options = (AttrSizedOperandSegments(as_property=True),
                    AttrSizedResultSegments(as_property=True))

    @classmethod
    def roles(cls, flat: dict[str, Attribute]) -> list[str]:
        return apply_roles(flat, ("delta",),
                           f"'upd.apply' needs optimizer = one of {', '.join(catalog.OPTIMIZERS)}")

    @classmethod
    def result_roles(cls, flat: dict[str, Attribute]) -> list[str]:
        return [r for r in cls.roles(flat) if r not in ("delta", "version", "step", "seed")]

    @classmethod
    def infer_result_types(cls, operand_types, attributes):
        roles = cls.roles(attributes)
        if len(roles) != len(operand_types):
            raise VerifyException(f"'upd.apply' operands must be ({', '.join(roles)})")
        optimizer = catalog.optimizer(attributes["optimizer"].data)  # type: ignore[union-attr]
        by_role = dict(zip(roles, operand_types))
        table = expect_master(by_role["table"], cls.name)
        results: list[Attribute] = [table]
        for st in optimizer.states:
            width = 1 if st.rowwise else table.dim.data
            results.append(expect_state(by_role[st.name], table, width, cls.name, st.name))
        delta = expect_delta(by_role["delta"], "'upd.apply' delta")
        check_delta_fits(delta, table, cls.name)
        if "serving" in by_role:
            serving = expect_table(by_role["serving"], "'upd.apply' serving copy")
            if (serving.rows, serving.dim) != (table.rows, table.dim):
                raise VerifyException("'upd.apply' serving copy must match the master's shape")
            results.append(serving)
        if "versions" in by_role:
            if not isinstance(by_role["versions"], VersionsType):
                raise VerifyException("'upd.apply' versions must be !emb.versions")
            results.append(by_role["versions"])
        for scalar in ("version", "step", "seed"):
            if scalar in by_role:
                expect_i64(by_role[scalar], cls.name, scalar)
        if optimizer.uses_step and "step" not in by_role:
            raise VerifyException(f"'upd.apply' with {optimizer.name} needs a step")
        return results

    def verify_(self) -> None:
        verify_inferred(self)
        self.check_schedule()
        flat = self.flat()
        opt = self.entry
        structural = {"optimizer", *APPLY_FLAGS, *APPLY_UNITS, *APPLY_SCHEDULE}
        known = {h.name: h for h in opt.hyper} | dict(catalog.GRAD_HYPER)
        for name in flat:
            if name not in structural and name not in known:
                raise VerifyException(f"'upd.apply' has no attribute '{name}'")
        check_hyper(self, known, [*opt.hyper_names, *catalog.GRAD_HYPER], skip=tuple(structural))
        check_positive(self, "lr")
        table = self.table.type
        delta = self.delta.type
        assert isinstance(table, TableType) and isinstance(delta, DeltaType)
        if self.stochastic_rounding is not None and table.layout.data == "f32":
            raise VerifyException("stochastic rounding needs an f16 or bf16 table")
        nonlinear = not opt.linear or any(
            n in flat for n in ("max_norm", "clip_value", "weight_decay"))
        if nonlinear and not (self.dedup is not None or delta.is_unique):
            raise VerifyException(
                "'upd.apply' is non-linear in the delta: it needs unique ids or 'dedup'"
            )

    def result_role(self, name: str):
        roles = self.result_roles(self.flat())
        return self.results[roles.index(name)] if name in roles else None


Upd = Dialect(
    "upd",
    [
        DeltaOp,
        DedupOp,
        ClipOp,
        WeightDecayOp,
        SgdOp,
        AdagradOp,
        RowwiseAdagradOp,
        AdamOp,
        RmspropOp,
        FtrlOp,
        OptimizeOp,
        StochasticRoundOp,
        RequantizeOp,
        StampOp,
        ApplyOp,
    ],
    [DeltaType],
)
