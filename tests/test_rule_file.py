"""Rule files without a kernel: parsing, the diff, idempotence, and the CLI's refusals."""

from __future__ import annotations

import json
import socket
from datetime import UTC, datetime
from importlib.resources import files
from pathlib import Path

import jsonschema
import pytest
from runner import run_cli

from agent.errors import EXIT_USAGE, UserError
from agent.policy import RuleStore, apply_rule_file, load_rule_file, parse_rule_file

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "deploy" / "rules.example.json"
SCHEMA = jsonschema.Draft202012Validator(
    json.loads((files("agent.schema") / "rules-file.v1.json").read_text())
)
NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def document(containers: dict[str, list[dict[str, object]]]) -> str:
    return json.dumps({"version": 1, "containers": containers})


def hosts(name: str, _port: None) -> list[tuple[object, ...]]:
    """A resolver that knows one name (nothing here touches DNS)."""
    assert name == "api.example.test"
    return [(socket.AF_INET, 0, 0, "", ("198.51.100.9", 0))]


def test_the_example_file_is_valid_by_schema_and_parser() -> None:
    SCHEMA.validate(json.loads(EXAMPLE.read_text()))
    parsed = load_rule_file(EXAMPLE)
    assert [r.key.dest for r in parsed["web"]] == ["0.0.0.0/0", "::/0", "198.51.100.0/24", "198.51.100.53/32"]
    assert parsed["retired-job"] == []


def test_toml_is_the_same_document(tmp_path: Path) -> None:
    toml = tmp_path / "rules.toml"
    toml.write_text(
        'version = 1\n[[containers.web]]\naction = "block"\ndest = "198.51.100.0/24"\nport = 443\nproto = "tcp"\n'
    )
    as_json = parse_rule_file(
        document({"web": [{"action": "block", "dest": "198.51.100.0/24", "port": 443, "proto": "tcp"}]})
    )
    assert load_rule_file(toml) == as_json


@pytest.mark.parametrize(
    ("containers_or_doc", "problem"),
    [
        ('{"version": 2, "containers": {}}', "format version 2 is newer"),
        ('{"version": 1}', "top-level fields ['version']"),
        ('{"version": 1, "containers": {"web": [], "extra": 1}}', "containers.extra is not a list"),
        ({"web": [{"action": "block"}]}, "containers.web[0] has fields ['action']"),
        ({"web": [{"action": "drop", "dest": "198.51.100.1"}]}, "unknown action 'drop'"),
        ({"web": [{"action": "block", "dest": "198.51.100.1", "port": "443"}]}, "port is '443'"),
        ({"web": [{"action": "block", "dest": "198.51.100.1", "port": True}]}, "port is True"),
        ({"web": [{"action": "block", "dest": "198.51.100.1", "port": 53, "proto": "icmp"}]}, "has no ports"),
        (
            {"web": [{"action": "block", "dest": "198.51.100.1", "learned": True}]},
            "fields ['action', 'dest', 'learned']",
        ),
        (
            {
                "web": [
                    {"action": "block", "dest": "198.51.100.1"},
                    {"action": "allow", "dest": "198.51.100.1/32"},
                ]
            },
            "containers.web[1]: a second rule for 198.51.100.1/32",
        ),
        ({"web": [], "/web": []}, "container web is named twice"),
        ({"bad name!": []}, "invalid container name"),
        ("{not json", "not valid JSON"),
    ],
)
def test_a_bad_file_is_one_error_naming_file_and_problem(
    tmp_path: Path, containers_or_doc: str | dict[str, list[dict[str, object]]], problem: str
) -> None:
    path = tmp_path / "rules.json"
    path.write_text(containers_or_doc if isinstance(containers_or_doc, str) else document(containers_or_doc))
    with pytest.raises(UserError) as caught:
        load_rule_file(path)
    assert str(caught.value).startswith(f"rule file {path}: ")
    assert problem in str(caught.value)
    assert caught.value.exit_code == EXIT_USAGE


def test_apply_replaces_named_containers_only_and_is_idempotent(tmp_path: Path) -> None:
    store = RuleStore(tmp_path)
    store.add("web", "198.51.100.3", action="block")
    store.add("web", "198.51.100.4", action="block", port=80, proto="tcp")
    store.add("other", "198.51.100.5", action="block")
    kept = store.rules("web")[1]
    wanted = parse_rule_file(
        document(
            {
                "web": [
                    {"action": "block", "dest": "198.51.100.4", "port": 80, "proto": "tcp"},
                    {"action": "allow", "dest": "api.example.test"},
                ]
            }
        )
    )
    diff = apply_rule_file(store, wanted, running={"web"}, resolver=hosts, now=NOW)
    assert diff == ["- web: block 198.51.100.3/32 any", "+ web: allow api.example.test any"]
    web = store.rules("web")
    assert web[0] == kept  # same identity and action: same rule id and age
    assert (web[1].addresses, web[1].pending, web[1].resolved_at) == (
        ("198.51.100.9/32",),
        False,
        "2026-01-02T03:04:05Z",
    )
    assert [r.summary() for r in store.rules("other")] == [
        "block 198.51.100.5/32 any"
    ]  # not named: untouched
    before = store.path.read_text()
    assert apply_rule_file(store, wanted, running={"web"}, resolver=hosts) == []
    assert store.path.read_text() == before  # the second apply wrote nothing


def test_order_is_age_and_a_changed_action_keeps_the_rule_id(tmp_path: Path) -> None:
    store = RuleStore(tmp_path)
    store.add("web", "198.51.100.3", action="block")
    store.add("web", "198.51.100.4", action="block")
    first, second = store.rules("web")
    swapped = parse_rule_file(
        document(
            {
                "web": [
                    {"action": "block", "dest": "198.51.100.4"},
                    {"action": "allow", "dest": "198.51.100.3"},
                ]
            }
        )
    )
    diff = apply_rule_file(store, swapped, running=(), now=NOW)
    assert diff == ["- web: block 198.51.100.3/32 any", "+ web: allow 198.51.100.3/32 any"]
    assert [(r.rule_id, r.action) for r in store.rules("web")] == [
        (second.rule_id, "block"),
        (first.rule_id, "allow"),
    ]


def test_an_empty_list_removes_a_containers_rules_and_its_slot(tmp_path: Path) -> None:
    store = RuleStore(tmp_path)
    store.add("web", "198.51.100.3", action="block")
    diff = apply_rule_file(store, parse_rule_file(document({"web": []})), running=())
    assert diff == ["- web: block 198.51.100.3/32 any"]
    assert store.rules() == [] and store.slots() == {}


def test_new_rules_of_a_container_not_running_are_pending(tmp_path: Path) -> None:
    store = RuleStore(tmp_path)
    apply_rule_file(
        store, parse_rule_file(document({"later": [{"action": "block", "dest": "198.51.100.3"}]})), running=()
    )
    assert [r.pending for r in store.rules("later")] == [True]


def test_dry_run_prints_the_diff_and_changes_nothing(tmp_path: Path) -> None:
    state = tmp_path / "state"
    RuleStore(state).add("web", "198.51.100.3", action="block")
    before = (state / "rules.json").read_text()
    path = tmp_path / "rules.json"
    path.write_text(
        document({"web": [{"action": "block", "dest": "198.51.100.0/24", "port": 443, "proto": "tcp"}]})
    )
    result = run_cli(
        "egress-rules", "apply", "--dry-run", str(path), env={"EGRESS_TOP_STATE_DIR": str(state)}
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "- web: block 198.51.100.3/32 any",
        "+ web: block 198.51.100.0/24 tcp/443",
        f"dry run: 1 rules added, 1 removed from {path}; nothing was changed",
    ]
    assert (state / "rules.json").read_text() == before


def test_the_cli_refuses_a_bad_file_with_one_line_and_exit_2(tmp_path: Path) -> None:
    state = tmp_path / "state"
    RuleStore(state).add("web", "198.51.100.3", action="block")
    before = (state / "rules.json").read_text()
    path = tmp_path / "rules.json"
    path.write_text('{"version": 1, "containers": {"web": [{"action": "block", "dest": "198.51.100.0/33"}]}}')
    result = run_cli("egress-rules", "apply", str(path), env={"EGRESS_TOP_STATE_DIR": str(state)})
    assert result.returncode == EXIT_USAGE
    [line] = result.stderr.splitlines()
    assert line.startswith(f"egress-rules: rule file {path}: containers.web[0]: invalid destination")
    assert (state / "rules.json").read_text() == before


def test_listing_still_works_without_a_subcommand(tmp_path: Path) -> None:
    state = tmp_path / "state"
    RuleStore(state).add("web", "198.51.100.3", action="block")
    env = {"EGRESS_TOP_STATE_DIR": str(state)}
    [row] = [
        json.loads(line) for line in run_cli("egress-rules", "web", "--json", env=env).stdout.splitlines()
    ]
    assert row["container"] == "web"
    assert (
        run_cli("egress-rules", "list", "--json", env=env).stdout
        == run_cli("egress-rules", "--json", env=env).stdout
    )


def test_the_agent_refuses_a_bad_rule_file_before_attaching(tmp_path: Path) -> None:
    path = tmp_path / "rules.json"
    path.write_text(
        '{"version": 1, "containers": {"web": [{"action": "block", "dest": "198.51.100.1", "port": 0}]}}'
    )
    result = run_cli("egress-agent", "run", "--metrics", "off", "--apply-rules", str(path))
    assert result.returncode == EXIT_USAGE
    assert result.stderr.splitlines() == [
        f"egress-agent: rule file {path}: containers.web[0]: port 0 is out of range: use 1-65535; nothing was changed"
    ]
