//! `/v1/accounts`: list, create and disable accounts (admins only).

use super::*;

pub(super) fn admin_only(actor: &Actor) -> Result<(), AdminError> {
    if actor.admin {
        Ok(())
    } else {
        Err(Reject::Forbidden {
            reason: "insufficient_permission",
            permission: Some(PERM_ADMIN.to_string()),
        }
        .into())
    }
}

pub(super) async fn list_accounts(gw: &Admin, actor: &Actor) -> Result<Response<Body>, AdminError> {
    let list = if actor.admin {
        gw.store_call(|s| s.list_accounts())
            .await
            .map_err(store_err)?
    } else {
        let id = actor.row.account_id.clone();
        vec![
            gw.store_call(move |s| s.get_account(&id))
                .await
                .map_err(store_err)?,
        ]
    };
    Ok(ok(
        StatusCode::OK,
        serde_json::json!({"accounts": list.iter().map(account_json).collect::<Vec<_>>()}),
    ))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AccountBody {
    name: String,
    email: Option<String>,
}

/// Account names: 1-64 letters, digits, `.`, `_`, `-`, `@` (as the CLI).
pub fn valid_account_name(n: &str) -> bool {
    lifecycle::valid_account_name(n)
}

pub(super) async fn create_account(
    gw: &Admin,
    actor: &Actor,
    ctx: &ApiCall,
    b: AccountBody,
) -> Result<Response<Body>, AdminError> {
    admin_only(actor)?;
    if !valid_account_name(&b.name) {
        return Err(AdminError::bad_request(
            "Account names are 1-64 letters, digits, `.`, `_`, `-`, `@`.",
        ));
    }
    if b.email
        .as_ref()
        .is_some_and(|e| e.len() > 254 || e.chars().any(char::is_control))
    {
        return Err(AdminError::bad_request(
            "The email is too long or contains control characters.",
        ));
    }
    let res = ctx.reserve(gw)?;
    let (now, label) = (gw.now_ms(), actor.label());
    let acc = gw
        .store_call(move |s| s.create_account(&b.name, b.email.as_deref(), &label, now))
        .await
        .map_err(store_err)?;
    Ok(account_done(
        ctx,
        actor,
        res,
        "account.created",
        StatusCode::CREATED,
        &acc,
    ))
}

/// Writes the audit line of an account change into its reserved slot and answers with the account.
pub(super) fn account_done(
    ctx: &ApiCall,
    actor: &Actor,
    res: Reservation,
    event: &str,
    status: StatusCode,
    acc: &Account,
) -> Response<Body> {
    // The target is the account id, as the CLI writes it (docs/audit.md); the name is `account`.
    let mut rec = ctx.event(actor, event, Some(&acc.id), None);
    rec.account = Some(acc.name.clone());
    res.send(Entry::Admin(rec));
    ok(status, account_json(acc))
}

pub(super) async fn disable_account(
    gw: &Admin,
    actor: &Actor,
    ctx: &ApiCall,
    name: &str,
) -> Result<Response<Body>, AdminError> {
    admin_only(actor)?;
    let caller = caller_of(&gw.config(), actor);
    let res = ctx.reserve(gw)?;
    let (n, now) = (name.to_string(), gw.now_ms());
    let acc = gw
        .store_call(move |s| Ok(lifecycle::disable_account(s, &caller, &n, now)))
        .await
        .map_err(store_err)?
        .map_err(|e| lifecycle_err(gw, ctx, actor, "disable_account", None, e))?;
    // Every token of the account is rejected by this process when this returns.
    gw.cache().invalidate_account(&acc.id);
    Ok(account_done(
        ctx,
        actor,
        res,
        "account.disabled",
        StatusCode::OK,
        &acc,
    ))
}
