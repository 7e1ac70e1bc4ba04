"""Live-server fixtures (owned by the serving area): a real `medtune serve` subprocess on a free port."""
