"""Command-line applications (cli, demo, daily, recommend, studies): they may import every layer."""
