from halp.cli import app

app(prog_name="halp")
