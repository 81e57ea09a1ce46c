"""The model registry's versions (auto_glm.registry): files, manifest and signature."""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "model_versions",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("copied", sa.Boolean, nullable=False),
        sa.Column("architecture", sa.String(255)),
        sa.Column("dtype", sa.String(64)),
        sa.Column("manifest", sa.Text, nullable=False),
        sa.Column("signature", sa.Text),
        sa.Column("signer", sa.String(64)),
        sa.Column("total_bytes", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("name", "version", name="uq_model_versions_name_version"),
    )


def downgrade() -> None:
    op.drop_table("model_versions")
