"""Production control: tenants, products, lines, work orders with quotas and allowlists, users and roles,
rework and scrap, and reconciliation (docs/production.md)."""

from appliance.production.audit import AuditSink
from appliance.production.model import Line, Product, ProductionError, Tenant, WorkOrder, WorkOrderSpec
from appliance.production.policy import WorkOrderPolicy
from appliance.production.users import AuthError, Permission, Role, User

__all__ = [
    "AuditSink",
    "AuthError",
    "Line",
    "Permission",
    "Product",
    "ProductionError",
    "Role",
    "Tenant",
    "User",
    "WorkOrder",
    "WorkOrderPolicy",
    "WorkOrderSpec",
]
