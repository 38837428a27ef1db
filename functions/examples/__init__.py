"""Small example handlers used by the demo, the tour in the README and the end-to-end tests."""
