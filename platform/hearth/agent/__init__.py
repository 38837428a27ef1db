"""The node agent's parts, one job each; :class:`hearth.node.NodeAgent` wires them together."""
