"""Egress rules, one room a job: each module's docstring says what it owns.

- rules.py: what a rule is (Rule, RuleKey, RuleSpec) and the checks on user input
- semantics.py: which rule decides a packet (most specific wins; the datapath's reference)
- names.py: host-name rules, resolved by the host and kept fresh
- compile.py: rules -> plain entries of the datapath's policy LPM trie
- document.py: the one parser of a versioned rule document (rules.json, rule files)
- store_document.py, store.py: rules.json in memory and on disk, locked and atomic
- rule_file.py, apply.py: declarative rule files (`egress-rules apply FILE`)

Importers outside the package use the names below; the rooms import each other directly.
"""

from agent.policy.apply import apply_rule_file
from agent.policy.compile import POLICY_ALLOW, POLICY_DROP, POLICY_KEY_FIXED_BITS, LpmEntry, lpm_entries
from agent.policy.names import Resolver, refresh_names, resolve
from agent.policy.rule_file import RuleFile, load_rule_file, parse_rule_file
from agent.policy.rules import Action, Protocol, Rule, parse_dest
from agent.policy.semantics import winning_rule
from agent.policy.store import RuleStore, default_state_dir
from agent.policy.store_document import StoreContents

__all__ = [
    "POLICY_ALLOW",
    "POLICY_DROP",
    "POLICY_KEY_FIXED_BITS",
    "Action",
    "LpmEntry",
    "Protocol",
    "Resolver",
    "Rule",
    "RuleFile",
    "RuleStore",
    "StoreContents",
    "apply_rule_file",
    "default_state_dir",
    "load_rule_file",
    "lpm_entries",
    "parse_dest",
    "parse_rule_file",
    "refresh_names",
    "resolve",
    "winning_rule",
]
