"""Model families: one file per architecture family, each implementing corp_cli.family.ModelFamily.

Nothing outside this package imports it: corp_cli.registry names the families by module
path and imports them on first use.
"""
