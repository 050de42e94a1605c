"""Generation engines behind one small interface (`apr.engine.base.Engine`), chosen by name."""
