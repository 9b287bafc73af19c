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

from xdsl.dialects.builtin import IntAttr, IntegerType, StringAttr, TensorType, UnitAttr
from xdsl.ir import Attribute, Dialect, ParametrizedAttribute, TypeAttribute
from xdsl.irdl import (
    irdl_attr_definition,
    irdl_op_definition,
    param_def,
    traits_def,
    var_operand_def,
    var_result_def,
)
from xdsl.parser import AttrParser
from xdsl.printer import Printer
from xdsl.pattern_rewriter import PatternRewriter, RewritePattern, op_type_rewrite_pattern
from xdsl.traits import HasCanonicalizationPatternsTrait, Pure
from xdsl.utils.exceptions import VerifyException

from .common import InferredResultsOp, get_float, get_string
from .emb import StateType, TableType, VersionsType, check_ids, check_rows, expect_table

OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad", "adam")
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


class UpdOp(InferredResultsOp):
    """Common verification: operand and attribute checks live in infer.

    Every upd op takes and yields variadic values whose roles `infer` checks;
    the two fields are declared once here (xDSL collects them from bases).
    """

    args = var_operand_def()
    res = var_result_def()

    def verify_(self) -> None:
        types = self.infer_result_types([o.type for o in self.operands], self.attributes)
        if [r.type for r in self.results] != list(types):
            expected = ", ".join(str(t) for t in types)
            raise VerifyException(f"'{self.name}' result types must be [{expected}]")
        self.verify_attributes()

    def verify_attributes(self) -> None:
        pass


@irdl_op_definition
class DeltaOp(UpdOp):
    """Makes a delta from an ids tensor and a rows tensor of equal length."""

    name = "upd.delta"
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


class DedupHasCanonicalizationPatterns(HasCanonicalizationPatternsTrait):
    @classmethod
    def get_canonicalization_patterns(cls) -> tuple[RewritePattern, ...]:
        return (RedundantDedup(),)


@irdl_op_definition
class DedupOp(UpdOp):
    """Sums the rows of equal ids: the result holds each id once."""

    name = "upd.dedup"
    traits = traits_def(Pure(), DedupHasCanonicalizationPatterns())

    @classmethod
    def infer_result_types(cls, operand_types, attributes):
        if len(operand_types) != 1:
            raise VerifyException("'upd.dedup' takes one delta")
        return [expect_delta(operand_types[0], "'upd.dedup' operand").with_unique()]


class RedundantDedup(RewritePattern):
    """dedup of a delta that is already unique is the delta itself."""

    @op_type_rewrite_pattern
    def match_and_rewrite(self, op: DedupOp, rewriter: PatternRewriter) -> None:
        source = op.operands[0]
        if isinstance(source.type, DeltaType) and source.type.is_unique:
            rewriter.replace_op(op, [], [source])


@irdl_op_definition
class ClipOp(UpdOp):
    """Clips each row: by value (clamp) and/or by its L2 norm (max_norm)."""

    name = "upd.clip"
    traits = traits_def(Pure())

    @classmethod
    def infer_result_types(cls, operand_types, attributes):
        if len(operand_types) != 1:
            raise VerifyException("'upd.clip' takes one delta")
        return [expect_delta(operand_types[0], "'upd.clip' operand")]

    def verify_attributes(self) -> None:
        if get_float(self, "max_norm") is None and get_float(self, "clip_value") is None:
            raise VerifyException("'upd.clip' needs max_norm or clip_value")
        check_positive(self, "max_norm", required=False)
        check_positive(self, "clip_value", required=False)


@irdl_op_definition
class WeightDecayOp(UpdOp):
    """Adds decay * w to each row's gradient (L2 regularization, as torch)."""

    name = "upd.weight_decay"
    traits = traits_def(Pure())

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


class OptimizerOp(UpdOp):
    """An optimizer step: (table, *state, delta[, step]) -> (table, *state)."""

    OPTIMIZER: ClassVar[str] = ""
    STATES: ClassVar[tuple[str, ...]] = ()
    ROWWISE: ClassVar[bool] = False
    HAS_STEP: ClassVar[bool] = False
    HYPER: ClassVar[tuple[str, ...]] = ("lr",)
    # torch.optim's defaults (FBGEMM's for rowwise Adagrad); lr has none
    DEFAULTS: ClassVar[dict[str, float]] = {}

    @classmethod
    def infer_result_types(cls, operand_types, attributes):
        n = 2 + len(cls.STATES) + int(cls.HAS_STEP)
        if len(operand_types) != n:
            parts = ["table", *[f"{s} state" for s in cls.STATES], "delta"]
            if cls.HAS_STEP:
                parts.append("step")
            raise VerifyException(f"'{cls.name}' takes {n} operands: {', '.join(parts)}")
        table = expect_master(operand_types[0], cls.name)
        width = 1 if cls.ROWWISE else table.dim.data
        states = [
            expect_state(t, table, width, cls.name, what)
            for t, what in zip(operand_types[1 : 1 + len(cls.STATES)], cls.STATES)
        ]
        delta = expect_delta(operand_types[1 + len(cls.STATES)], f"'{cls.name}' delta")
        check_delta_fits(delta, table, cls.name)
        if cls.HAS_STEP:
            expect_i64(operand_types[-1], cls.name, "step")
        return [table, *states]

    def verify_attributes(self) -> None:
        for name in self.HYPER:
            if name in ("lr", "eps"):
                check_positive(self, name, required=name == "lr")
        for name in self.attributes:
            if name not in self.HYPER:
                raise VerifyException(
                    f"'{self.name}' has no hyper-parameter '{name}' "
                    f"(it takes {', '.join(self.HYPER)})"
                )

    @property
    def table(self):
        return self.operands[0]

    @property
    def delta(self):
        return self.operands[1 + len(self.STATES)]


@irdl_op_definition
class SgdOp(OptimizerOp):
    name = "upd.sgd"
    OPTIMIZER: ClassVar[str] = "sgd"


@irdl_op_definition
class AdagradOp(OptimizerOp):
    name = "upd.adagrad"
    OPTIMIZER: ClassVar[str] = "adagrad"
    STATES: ClassVar[tuple[str, ...]] = ("sum",)
    HAS_STEP: ClassVar[bool] = True
    HYPER: ClassVar[tuple[str, ...]] = ("lr", "eps", "lr_decay")
    DEFAULTS: ClassVar[dict[str, float]] = {"eps": 1e-10, "lr_decay": 0.0}


@irdl_op_definition
class RowwiseAdagradOp(OptimizerOp):
    name = "upd.rowwise_adagrad"
    OPTIMIZER: ClassVar[str] = "rowwise_adagrad"
    STATES: ClassVar[tuple[str, ...]] = ("momentum",)
    ROWWISE: ClassVar[bool] = True
    HYPER: ClassVar[tuple[str, ...]] = ("lr", "eps")
    DEFAULTS: ClassVar[dict[str, float]] = {"eps": 1e-8}


@irdl_op_definition
class AdamOp(OptimizerOp):
    name = "upd.adam"
    OPTIMIZER: ClassVar[str] = "adam"
    STATES: ClassVar[tuple[str, ...]] = ("exp_avg", "exp_avg_sq")
    HAS_STEP: ClassVar[bool] = True
    HYPER: ClassVar[tuple[str, ...]] = ("lr", "beta1", "beta2", "eps")
    DEFAULTS: ClassVar[dict[str, float]] = {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8}

    def verify_attributes(self) -> None:
        super().verify_attributes()
        for beta in ("beta1", "beta2"):
            value = get_float(self, beta)
            if value is not None and not 0.0 <= value < 1.0:
                raise VerifyException(f"'upd.adam' {beta} must be in [0, 1), got {value}")


OPTIMIZER_OPS: dict[str, type[OptimizerOp]] = {
    op.OPTIMIZER: op for op in (SgdOp, AdagradOp, RowwiseAdagradOp, AdamOp)
}


@irdl_op_definition
class StochasticRoundOp(UpdOp):
    """Rounds the rows an optimizer just wrote stochastically, not to nearest.

    Only meaningful on f16/bf16 tables, and only right after the optimizer
    whose exact f32 results it rounds: the operand must be that op's table.
    """

    name = "upd.stochastic_round"

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
APPLY_FLOATS = (
    "lr", "eps", "beta1", "beta2", "lr_decay", "weight_decay", "max_norm", "clip_value",
)
APPLY_UNITS = ("dedup", "stochastic_rounding", "sort")
APPLY_INTS = ("partitions", "tile")


def apply_roles(attributes: dict[str, Attribute], data: tuple[str, ...],
                unknown: str) -> list[str]:
    """Operand roles of a fused update (upd.apply, and kern.update below it).

    table, *optimizer state, `data` (the delta, or its ids and grads),
    [serving], [versions, version], [step], [seed]: the unit attributes of
    the same names say which optional ones are present. `unknown` is the
    error for a missing or unknown optimizer.
    """
    opt = attributes.get("optimizer")
    if not isinstance(opt, StringAttr) or opt.data not in OPTIMIZER_OPS:
        raise VerifyException(unknown)
    roles = ["table", *OPTIMIZER_OPS[opt.data].STATES, *data]
    if "serving" in attributes:
        roles.append("serving")
    if "versions" in attributes:
        roles += ["versions", "version"]
    for scalar in ("step", "seed"):
        if scalar in attributes:
            roles.append(scalar)
    return roles


@irdl_op_definition
class ApplyOp(UpdOp):
    """A fused update: one kernel that touches each row of the delta once.

    Operands: table, *state, delta, [serving], [versions, version], [step],
    [seed]; the unit attributes `serving`, `versions`, `step`, `seed` say which
    optional ones are present. Results: table, *state, [serving], [versions].
    `optimizer` names the step; floats carry the hyper-parameters, clipping
    and weight decay; `dedup` sums duplicates inside the kernel;
    upd-schedule adds `sort`, `partitions` and `tile`.
    """

    name = "upd.apply"

    @classmethod
    def layout(cls, attributes: dict[str, Attribute]) -> list[str]:
        """The role of each operand, in order."""
        return apply_roles(attributes, ("delta",),
                           f"'upd.apply' needs optimizer = one of {', '.join(OPTIMIZERS)}")

    @classmethod
    def infer_result_types(cls, operand_types, attributes):
        roles = cls.layout(attributes)
        if len(roles) != len(operand_types):
            raise VerifyException(f"'upd.apply' operands must be ({', '.join(roles)})")
        optimizer = OPTIMIZER_OPS[attributes["optimizer"].data]  # type: ignore[union-attr]
        by_role = dict(zip(roles, operand_types))
        table = expect_master(by_role["table"], cls.name)
        width = 1 if optimizer.ROWWISE else table.dim.data
        results: list[Attribute] = [table]
        for what in optimizer.STATES:
            results.append(expect_state(by_role[what], table, width, cls.name, what))
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
        if optimizer.HAS_STEP and "step" not in by_role:
            raise VerifyException(f"'upd.apply' with {optimizer.OPTIMIZER} needs a step")
        return results

    def verify_attributes(self) -> None:
        known = {"optimizer", *APPLY_FLAGS, *APPLY_FLOATS, *APPLY_UNITS, *APPLY_INTS}
        for name, attr in self.attributes.items():
            if name not in known:
                raise VerifyException(f"'upd.apply' has no attribute '{name}'")
            if name in APPLY_UNITS + APPLY_FLAGS and not isinstance(attr, UnitAttr):
                raise VerifyException(f"'upd.apply' attribute '{name}' is a unit flag")
        check_positive(self, "lr")
        table = self.operands[0].type
        delta = self.operands[self.layout(self.attributes).index("delta")].type
        assert isinstance(table, TableType) and isinstance(delta, DeltaType)
        if "stochastic_rounding" in self.attributes and table.layout.data == "f32":
            raise VerifyException("stochastic rounding needs an f16 or bf16 table")
        nonlinear = get_string(self, "optimizer") != "sgd" or any(
            n in self.attributes for n in ("max_norm", "clip_value", "weight_decay")
        )
        if nonlinear and not ("dedup" in self.attributes or delta.is_unique):
            raise VerifyException(
                "'upd.apply' is non-linear in the delta: it needs unique ids or 'dedup'"
            )

    def role(self, name: str):
        """The operand playing `name`, or None when absent."""
        roles = self.layout(self.attributes)
        return self.operands[roles.index(name)] if name in roles else None

    def result_role(self, name: str):
        roles = [r for r in self.layout(self.attributes) if r not in ("delta", "version", "step", "seed")]
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
        StochasticRoundOp,
        RequantizeOp,
        StampOp,
        ApplyOp,
    ],
    [DeltaType],
)
