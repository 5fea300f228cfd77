"""RLMComponent: RLM assets declared in YAML, loaded with Dagster's component testing helpers."""

from __future__ import annotations

import inspect
import re
import textwrap
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
import pytest
from dagster.components.component_scaffolding import scaffold_object
from dagster.components.core.package_entry import (
    DG_PLUGIN_ENTRY_POINT_GROUP,
    discover_entry_point_package_objects,
)
from dagster.components.testing import DefsFolderSandbox, create_defs_folder_sandbox
from dagster_duckdb import DuckDBResource
from dagster_shared.serdes.objects import EnvRegistryKey

import rlm_dagster
from rlm_dagster import RLMComponent, RLMResource, rlm_asset
from rlm_dagster.dagster.assets import DEFAULT_RETRY_POLICY
from rlm_dagster.errors import ConfigError, OutputSchemaError
from rlm_dagster.testing import FakeAnthropic

# Metadata the component system adds to every component's assets (a link to the YAML file and
# the component instance); everything else must match rlm_asset.
COMPONENT_METADATA = {"dagster/code_references", "dagster/component_origin"}

FULL_YAML = """\
type: rlm_dagster.RLMComponent
attributes:
  name: churn_reasons
  question: Which enterprise customers threatened to cancel, and why?
  tables: [tickets, customers]
  output: {customer_id: BIGINT, reason: VARCHAR}
  max_iterations: 7
  max_depth: 2
  max_sub_calls: 300
  max_cost_usd: 1.5
  max_tokens: 200000
  max_wall_time_s: 600
  cell_timeout_s: 30
  max_observation_chars: 5000
  key_prefix: [support, insights]
  group_name: churn
  description: Churn threats, per ticket.
  tags: {domain: support}
  owners: ["team:support"]
  root_model: claude-sonnet-5-5
  sub_model: claude-haiku-5-5
  partitions_def: {type: daily, start_date: "2026-05-01"}
  partition_column: {tickets: created_at}
  retry_policy: {max_retries: 1, delay: 5, backoff: linear, jitter: null}
  pool: anthropic
  context: raw/ticket_guidelines
  rlm_resource_key: claude
  duckdb_resource_key: warehouse
"""

FULL_KWARGS: dict[str, Any] = dict(
    name="churn_reasons",
    question="Which enterprise customers threatened to cancel, and why?",
    tables=["tickets", "customers"],
    output={"customer_id": "BIGINT", "reason": "VARCHAR"},
    max_iterations=7,
    max_depth=2,
    max_sub_calls=300,
    max_cost_usd=1.5,
    max_tokens=200_000,
    max_wall_time_s=600.0,  # float attributes are floats, in the code version too
    cell_timeout_s=30.0,
    max_observation_chars=5_000,
    key_prefix=["support", "insights"],
    group_name="churn",
    description="Churn threats, per ticket.",
    tags={"domain": "support"},
    owners=["team:support"],
    root_model="claude-sonnet-5-5",
    sub_model="claude-haiku-5-5",
    partitions_def=dg.DailyPartitionsDefinition(start_date="2026-05-01"),
    partition_column={"tickets": "created_at"},
    retry_policy=dg.RetryPolicy(max_retries=1, delay=5, backoff=dg.Backoff.LINEAR),
    pool="anthropic",
    context=dg.AssetKey(["raw", "ticket_guidelines"]),
    rlm_resource_key="claude",
    duckdb_resource_key="warehouse",
)


@pytest.fixture(autouse=True)
def _quiet_beta_warnings() -> Iterator[None]:
    # Component loading attaches beta-labelled code-reference metadata; not our concern here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.BetaWarning)
        yield


@pytest.fixture
def sandbox() -> Iterator[DefsFolderSandbox]:
    with create_defs_folder_sandbox() as box:
        yield box


def write_defs(sandbox: DefsFolderSandbox, yaml_text: str, folder: str = "question") -> Path:
    path = sandbox.defs_folder_path / folder
    path.mkdir()
    (path / "defs.yaml").write_text(textwrap.dedent(yaml_text), encoding="utf-8")
    return path


@contextmanager
def load_yaml(
    sandbox: DefsFolderSandbox, yaml_text: str
) -> Iterator[tuple[dg.Component, dg.Definitions]]:
    with sandbox.load_component_and_build_defs(defs_path=write_defs(sandbox, yaml_text)) as loaded:
        yield loaded


def only_asset(defs: dg.Definitions) -> dg.AssetsDefinition:
    (asset,) = [a for a in defs.assets or [] if isinstance(a, dg.AssetsDefinition)]
    return asset


def described(asset: dg.AssetsDefinition) -> dict[str, Any]:
    """Everything a user can see of an RLM asset definition, to compare YAML with Python."""
    (spec,) = asset.specs
    return {
        "key": spec.key,
        "deps": sorted(dep.asset_key for dep in spec.deps),
        "kinds": spec.kinds,
        "code_version": spec.code_version,
        "partitions_def": spec.partitions_def,
        "group_name": spec.group_name,
        "description": spec.description,
        "tags": spec.tags,
        "owners": spec.owners,
        "metadata": {k: v for k, v in spec.metadata.items() if k not in COMPONENT_METADATA},
        "checks": sorted(
            (c.key.name, c.blocking, c.description)
            for c in asset.check_specs_by_output_name.values()
        ),
        "resources": asset.required_resource_keys,
        "retry_policy": asset.op.retry_policy,
        "pool": asset.op.pool,
    }


def causes(err: BaseException) -> Iterator[BaseException]:
    current: BaseException | None = err
    while current is not None:
        yield current
        current = current.__cause__ or current.__context__


def test_yaml_asset_matches_rlm_asset(sandbox: DefsFolderSandbox) -> None:
    with load_yaml(sandbox, FULL_YAML) as (component, defs):
        assert isinstance(component, RLMComponent)
        from_yaml = described(only_asset(defs))
    from_python = described(rlm_asset(**FULL_KWARGS))
    assert from_yaml == from_python
    assert from_yaml["key"] == dg.AssetKey(["support", "insights", "churn_reasons"])
    assert from_yaml["deps"] == [
        dg.AssetKey("customers"),
        dg.AssetKey(["raw", "ticket_guidelines"]),
        dg.AssetKey("tickets"),
    ]
    assert from_yaml["kinds"] == {"rlm", "anthropic", "duckdb"}
    assert from_yaml["resources"] - {"io_manager"} == {"claude", "warehouse"}
    assert [name for name, _, _ in from_yaml["checks"]] == [
        "answer_not_empty",
        "llm_where_rows_decided",
        "output_schema",
        "spend_within_budget",
    ]


def test_minimal_yaml_takes_rlm_asset_defaults(sandbox: DefsFolderSandbox) -> None:
    yaml_text = """\
        type: rlm_dagster.RLMComponent
        attributes:
          name: themes
          question: What are the main themes of urgent tickets?
          tables: [tickets]
        """
    with load_yaml(sandbox, yaml_text) as (_, defs):
        from_yaml = described(only_asset(defs))
    python = rlm_asset(
        name="themes", question="What are the main themes of urgent tickets?", tables=["tickets"]
    )
    assert from_yaml == described(python)
    assert from_yaml["retry_policy"] == DEFAULT_RETRY_POLICY
    assert from_yaml["resources"] - {"io_manager"} == {"rlm", "duckdb"}


def test_readme_example_loads(sandbox: DefsFolderSandbox) -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Declaring RLM assets in YAML", 1)[1]
    example = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    with load_yaml(sandbox, example) as (_, defs):
        asset = only_asset(defs)
    assert asset.key == dg.AssetKey("churn_reasons")
    assert isinstance(asset.partitions_def, dg.DailyPartitionsDefinition)


def test_several_assets_in_one_file_as_yaml_documents(sandbox: DefsFolderSandbox) -> None:
    one = (
        "type: rlm_dagster.RLMComponent\nattributes:\n  name: {}\n  question: Why?\n  tables: [t]\n"
    )
    write_defs(sandbox, one.format("first") + "---\n" + one.format("second"))
    with sandbox.build_all_defs() as defs:
        keys = {a.key for a in defs.assets or [] if isinstance(a, dg.AssetsDefinition)}
    assert keys == {dg.AssetKey("first"), dg.AssetKey("second")}


def test_every_rlm_asset_keyword_is_an_attribute_with_the_same_default() -> None:
    """The YAML attributes are rlm_asset's keywords: both are RLMAssetArgs' fields (only the
    translator, a Python object, is rlm_asset's alone)."""
    from rlm_dagster.dagster.definition import RLMAssetArgs

    fields = RLMComponent.model_fields
    assert fields.keys() == RLMAssetArgs.model_fields.keys()
    parameters = dict(inspect.signature(rlm_asset).parameters)
    assert parameters.pop("translator").default is None
    assert set(fields) == set(parameters)
    for name, parameter in parameters.items():
        if parameter.default is inspect.Parameter.empty:
            assert fields[name].is_required(), name
        else:
            assert fields[name].default == parameter.default, name


def test_static_partitions(sandbox: DefsFolderSandbox) -> None:
    yaml_text = """\
        type: rlm_dagster.RLMComponent
        attributes:
          name: by_channel
          question: What do customers complain about most?
          tables: [tickets]
          partitions_def: {type: static, partition_keys: [web, email]}
          partition_column: channel
        """
    with load_yaml(sandbox, yaml_text) as (_, defs):
        partitions = only_asset(defs).partitions_def
    assert partitions == dg.StaticPartitionsDefinition(["web", "email"])


@pytest.mark.parametrize(
    ("retry_policy", "expected"),
    [
        ("{}", DEFAULT_RETRY_POLICY),
        ("null", None),
        ("{max_retries: 1, jitter: full}",
         dg.RetryPolicy(max_retries=1, delay=30, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.FULL)),
    ],
)  # fmt: skip
def test_retry_policy(
    sandbox: DefsFolderSandbox, retry_policy: str, expected: dg.RetryPolicy | None
) -> None:
    yaml_text = f"""\
        type: rlm_dagster.RLMComponent
        attributes:
          name: q
          question: Why?
          tables: [tickets]
          retry_policy: {retry_policy}
        """
    with load_yaml(sandbox, yaml_text) as (_, defs):
        assert only_asset(defs).op.retry_policy == expected


@pytest.mark.parametrize(
    ("attributes", "error", "names"),
    [
        ("question: Why?\ntables: [tickets]\noutput: {reason: TEXTT}", OutputSchemaError,
         ["output=", "'reason'", "'TEXTT'"]),
        ("question: '  '\ntables: [tickets]", ConfigError, ["question="]),
        ("question: Why?\ntables: []", ConfigError, ["tables="]),
        ("question: Why?\ntables: [tickets]\npartition_column: created_at", ConfigError,
         ["partition_column="]),
        ("question: Why?\ntables: [tickets]\npartitions_def: {type: daily, start_date: '2026-01-01'}",
         ConfigError, ["partition_column="]),
        ("question: Why?\ntables: [tickets]\npartitions_def: {type: static, partition_keys: [a]}\n"
         "partition_column: {orders: order_date}", ConfigError, ["partition_column", "['orders']"]),
    ],
)  # fmt: skip
def test_invalid_attributes_raise_config_error_naming_them(
    sandbox: DefsFolderSandbox, attributes: str, error: type[ConfigError], names: list[str]
) -> None:
    yaml_text = "type: rlm_dagster.RLMComponent\nattributes:\n  name: bad\n" + textwrap.indent(
        attributes, "  "
    )
    with pytest.raises(Exception) as raised, load_yaml(sandbox, yaml_text):
        pass
    (ours, *_) = [e for e in causes(raised.value) if isinstance(e, ConfigError)]
    assert type(ours) is error
    message = str(ours)
    assert message.startswith("Invalid attributes of RLMComponent 'bad' (src/")
    assert "defs/question)" in message
    for name in names:
        assert name in message


@pytest.mark.parametrize(
    ("attributes", "names"),
    [
        ("tables: [tickets]", ["attributes.question", "defs.yaml:2", "Field required"]),
        ("question: Why?\ntables: [tickets]\nmax_iteration: 3", ["max_iteration", "defs.yaml:6"]),
        ("question: Why?\ntables: [tickets]\npartitions_def: {daily: {start_date: '2026-01-01'}}",
         ["attributes.partitions_def", "discriminator 'type'", "defs.yaml:6"]),
        ("question: Why?\ntables: [tickets]\nretry_policy: {backoff: exponentially}",
         ["attributes.retry_policy", "'linear' or 'exponential'", "defs.yaml:6"]),
    ],
)  # fmt: skip
def test_yaml_schema_errors_name_the_attribute_and_line(
    sandbox: DefsFolderSandbox, attributes: str, names: list[str]
) -> None:
    """Shape errors are caught by Dagster's YAML validation, with the file and line."""
    yaml_text = "type: rlm_dagster.RLMComponent\nattributes:\n  name: bad\n" + textwrap.indent(
        attributes, "  "
    )
    with pytest.raises(Exception) as raised, load_yaml(sandbox, yaml_text):
        pass
    message = "\n".join(str(e) for e in causes(raised.value))
    for name in names:
        assert name in message


def scaffold_as_dg_does(sandbox: DefsFolderSandbox, folder: str) -> Path:
    """What `dg scaffold defs rlm_dagster.RLMComponent <folder>` runs in the project's env."""
    path = sandbox.defs_folder_path / folder
    scaffold_object(
        path=path,
        typename="rlm_dagster.RLMComponent",
        json_params=None,
        scaffold_format="yaml",
        project_root=sandbox.project_root,
    )
    return path


def test_scaffolded_template_loads(sandbox: DefsFolderSandbox) -> None:
    path = scaffold_as_dg_does(sandbox, "my_question")
    text = (path / "defs.yaml").read_text()
    assert text.startswith("# One RLM asset")
    assert "type: rlm_dagster.RLMComponent\n" in text
    with sandbox.load_component_and_build_defs(defs_path=path) as (component, defs):
        assert isinstance(component, RLMComponent)
        asset = only_asset(defs)
    assert asset.key == dg.AssetKey("my_question")
    assert {d.asset_key for d in asset.specs_by_key[asset.key].deps} == {
        dg.AssetKey("tickets"),
        dg.AssetKey("customers"),
    }
    assert "customers" in component.question and component.output is not None


def test_scaffolded_template_comments_are_valid_attributes(sandbox: DefsFolderSandbox) -> None:
    """Uncommenting every optional attribute in the template still loads."""
    path = scaffold_as_dg_does(sandbox, "all_options")
    text = (path / "defs.yaml").read_text()
    uncommented = re.sub(r"^  # (\w+:)", r"  \1", text, flags=re.MULTILINE)
    assert uncommented.count("\n") == text.count("\n") and uncommented != text
    (path / "defs.yaml").write_text(uncommented)
    with sandbox.load_component_and_build_defs(defs_path=path) as (_, defs):
        asset = only_asset(defs)
    assert asset.key == dg.AssetKey(["support", "all_options"])
    assert isinstance(asset.partitions_def, dg.DailyPartitionsDefinition)
    assert dg.AssetKey("support_playbook") in asset.keys_by_input_name.values()


def test_scaffolder_names_the_asset_after_the_folder(sandbox: DefsFolderSandbox) -> None:
    path = sandbox.scaffold_component(component_cls=RLMComponent, defs_path="urgent-themes")
    text = (path / "defs.yaml").read_text()
    assert "type: rlm_dagster.dagster.component.RLMComponent\n" in text
    assert "  name: urgent_themes\n" in text


def test_scaffolder_appends_a_yaml_document(sandbox: DefsFolderSandbox) -> None:
    path = scaffold_as_dg_does(sandbox, "churn")
    scaffold_object(
        path=path / "defs.yaml",
        typename="rlm_dagster.RLMComponent",
        json_params=None,
        scaffold_format="yaml",
        project_root=sandbox.project_root,
        append=True,
    )
    with sandbox.build_all_defs() as defs:
        keys = {a.key for a in defs.assets or [] if isinstance(a, dg.AssetsDefinition)}
    assert keys == {dg.AssetKey("churn"), dg.AssetKey("my_question")}


def test_scaffolder_python_format_is_dagsters_default(sandbox: DefsFolderSandbox) -> None:
    path = sandbox.scaffold_component(
        component_cls=RLMComponent, defs_path="in_python", scaffold_format="python"
    )
    assert (
        "def load(context: dg.ComponentLoadContext) -> RLMComponent"
        in (path / "component.py").read_text()
    )
    assert not (path / "defs.yaml").exists()


def test_entry_point_registers_the_component(monkeypatch: pytest.MonkeyPatch) -> None:
    (entry_point,) = [
        e for e in entry_points(group=DG_PLUGIN_ENTRY_POINT_GROUP) if e.name == "rlm_dagster"
    ]
    assert entry_point.value == "rlm_dagster"
    assert entry_point.load().RLMComponent is RLMComponent
    # dg lists what dir() of the module shows; the export is lazy, so drop any cached copy.
    monkeypatch.delitem(vars(rlm_dagster), "RLMComponent", raising=False)
    registry = discover_entry_point_package_objects()
    assert registry[EnvRegistryKey(name="RLMComponent", namespace="rlm_dagster")] is RLMComponent


def test_yaml_asset_materializes_end_to_end(
    sandbox: DefsFolderSandbox, warehouse_file: str
) -> None:
    yaml_text = """\
        type: rlm_dagster.RLMComponent
        attributes:
          name: ticket_count
          question: How many support tickets are there?
          tables: [tickets]
          output: {n: BIGINT}
          max_iterations: 3
        """
    root = ["```repl\nFINAL(sql('SELECT count(*) AS n FROM tickets'))\n```"]
    with load_yaml(sandbox, yaml_text) as (_, defs), FakeAnthropic(root=root) as fake:
        result = dg.materialize(
            [only_asset(defs)],
            resources={
                "rlm": RLMResource(api_key="k", base_url=fake.base_url, root_model="fake-root"),
                "duckdb": DuckDBResource(database=warehouse_file),
            },
        )
        assert fake.count("root") == 1
    assert result.success
    with duckdb.connect(warehouse_file, read_only=True) as con:
        (expected,) = con.execute("SELECT count(*) FROM tickets").fetchone() or ()
        assert con.execute("SELECT n FROM main.ticket_count").fetchall() == [(expected,)]
    (materialization,) = result.asset_materializations_for_node("ticket_count")
    assert materialization.metadata["dagster/row_count"].value == 1
    checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
    assert checks == {
        "answer_not_empty": True,
        "spend_within_budget": True,
        "output_schema": True,
        "llm_where_rows_decided": True,
    }
