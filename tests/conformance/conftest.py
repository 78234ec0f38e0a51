"""The appliance's floor (CA hierarchy, tenant, product, line L1) comes from the appliance tests' templates."""

from tests.appliance.conftest import ca_journal_template, production_journal_template

__all__ = ["ca_journal_template", "production_journal_template"]
