"""Hearth on many nodes: the peer registry (who is alive, where, serving what), the
agent-to-agent link (slot → socket → slot), and the routing that forwards an invocation to the
node hosting its function."""
