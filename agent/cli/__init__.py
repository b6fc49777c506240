"""Command-line front ends, a room each. Thin: parse, check, call the layers, print.

Every check that can fail (root, Docker, bpffs, headers, unknown container) runs before
anything is attached, and a UserError becomes one line on stderr and a non-zero exit
(common.py). Each console script imports only its own room, so a quick command such as
egress-block does not pay for the screen, the flow tables or the metrics server:

- top.py: egress-top (screen, plain lines, NDJSON)
- rules.py: egress-block, egress-allow, egress-unblock; dry_run.py: their --dry-run
- ruleset.py: egress-rules (list, apply a rule file)
- agent.py: egress-agent run, status, cleanup
- monitoring.py: the loop egress-top and the agent share; common.py: errors, signals, logging
"""
