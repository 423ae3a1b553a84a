"""Example 3: templated welcome e-mails sent through Conveyor's mail pipeline."""
