"""The KFP pipelines, one per file (compiled IR YAML beside each); they chain the components in components/."""
